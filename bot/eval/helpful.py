"""Does the chat adapter stay helpful? (issue 11)

On hand-written requests and questions with hand-written answers (the repository keeps them in
``instructions.jsonl`` beside the tests, never trained on), three figures against the bare backbone:

* ``ppl_ratio``: perplexity of the hand-written answers under the adapter / under the base;
* ``length_ratio``: median reply length (words) of the adapter / of the base;
* ``dialogue_ppl_change``: held-out dialogue perplexity, adapter / base - 1 (from the chat eval).

Replies are decoded greedily through the session's shared scheduler, many at once.
"""

from __future__ import annotations

import statistics
from concurrent.futures import ThreadPoolExecutor

TARGETS = {"ppl_ratio": 1.1, "length_ratio": 0.6, "dialogue_ppl_change": -0.2}
ANSWER_TOKENS = 256  # the hand-written answers are a paragraph: do not cut them at train length


def words(text: str) -> int:
    return len(text.split())


def _replies(session, prompts: list[str], adapter: str | None, max_tokens: int) -> list[str]:
    from bot.chat import REPETITION_PENALTY  # lazy: bot.chat imports transformers
    from bot.engine import SamplingParams  # lazy: bot.engine imports transformers

    tok = session.backbone.tokenizer
    params = SamplingParams(max_tokens=max_tokens, repetition_penalty=REPETITION_PENALTY)

    def one(prompt: str) -> str:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, return_dict=True)["input_ids"]
        return session.scheduler.generate(list(ids), adapter, params).strip()

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, prompts))


def _router_pick(session, prompt: str, base: str, tuned: str, name: str) -> tuple[str, str]:
    """(route, reply) for the router's choice; generated replies are reused, not redone."""
    route = session.router.route(prompt).adapter
    task = session.tasks.get(route)
    if task is not None and task.kind == "base":
        return route, base
    if route == name:
        return route, tuned
    return route, session.fork().send(prompt).reply


def eval_instructions(session, rows: list[dict], name: str = "chat",
                      dialogue_ppl_change: float | None = None, max_tokens: int = 160) -> dict:
    """The three figures, with every reply side by side (base, adapter, router's pick).

    Args:
        session: a ChatSession holding the generate task ``name`` and a router.
        rows: ``{"prompt", "reply"}`` rows: requests and hand-written answers.
        dialogue_ppl_change: from the held-out dialogue evaluation of ``name``.
        max_tokens: reply cap for both models.
    """
    task = session.tasks[name]
    ppl_base = task.perplexity(rows, adapter=None, max_length=ANSWER_TOKENS)
    ppl_adapter = task.perplexity(rows, max_length=ANSWER_TOKENS)
    prompts = [r["prompt"] for r in rows]
    base = _replies(session, prompts, None, max_tokens)
    tuned = _replies(session, prompts, task.adapter_name, max_tokens)
    samples = []
    for prompt, b, t in zip(prompts, base, tuned, strict=True):
        route, pick = _router_pick(session, prompt, b, t, name)
        samples.append({"prompt": prompt, "base": b, "adapter": t, "route": route, "routed": pick})
    length_base = statistics.median(words(b) for b in base)
    length_adapter = statistics.median(words(t) for t in tuned)
    out = {"n": len(rows), "ppl_base": ppl_base, "ppl_adapter": ppl_adapter,
           "ppl_ratio": ppl_adapter / ppl_base, "length_base": length_base,
           "length_adapter": length_adapter,
           "length_ratio": length_adapter / length_base if length_base else None,
           "dialogue_ppl_change": dialogue_ppl_change, "max_tokens": max_tokens,
           "routed_to": {r: sum(s["route"] == r for s in samples) for r in {s["route"] for s in samples}},
           "samples": samples}
    out["met"] = met(out)
    return out


def met(result: dict) -> dict[str, bool | None]:
    """Each target: True, False, or None when the figure is missing."""
    def check(key, ok):
        value = result.get(key)
        return None if value is None else bool(ok(value))
    return {"ppl_ratio": check("ppl_ratio", lambda v: v <= TARGETS["ppl_ratio"]),
            "length_ratio": check("length_ratio", lambda v: v >= TARGETS["length_ratio"]),
            "dialogue_ppl_change": check("dialogue_ppl_change",
                                         lambda v: v <= TARGETS["dialogue_ppl_change"])}
