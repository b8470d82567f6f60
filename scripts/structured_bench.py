"""Tokens/s of 8 concurrent replies, free vs constrained by a grammar (issue 27 item 1's target:
constrained decoding at most 1.2x slower than free decoding at 8 clients).

The real backbone on the engine (bot.engine.Scheduler), end-of-sequence ignored so every
reply runs its full length; each round runs the free and the constrained batch back to
back, so both see the same machine load.

    nice -n 19 .venv/bin/python scripts/structured_bench.py [--clients 8] [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from bot.engine import SamplingParams, Scheduler
from bot.engine.grammar import Grammar
from bot.model.backbone import Backbone

SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}},
          "required": ["story"]}  # never complete within the reply: every reply runs full length


def run_batch(sched, prompt, params_for, clients: int) -> float:
    """Seconds for ``clients`` replies submitted at once."""
    out = [None] * clients

    def one(i):
        out[i] = sched.generate_ids(prompt, None, params_for(i))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    assert all(len(o) == len(out[0]) for o in out), [len(o) for o in out]
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    bb = Backbone.load()
    sched = Scheduler(bb, precision=args.precision, max_batch=args.clients)
    sched.eos = set()
    prompt = list(bb.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me a story as JSON."}], add_generation_prompt=True,
        return_dict=True)["input_ids"])
    vocab = bb.base.config.vocab_size
    grammar = Grammar.json_schema(bb.tokenizer, vocab, SCHEMA)
    free = lambda i: SamplingParams(max_tokens=args.tokens)  # noqa: E731
    constrained = lambda i: SamplingParams(max_tokens=args.tokens, grammar=grammar)  # noqa: E731
    run_batch(sched, prompt, free, args.clients)  # warm-up
    run_batch(sched, prompt, constrained, args.clients)
    tokens = args.clients * args.tokens
    rates = {"free": [], "constrained": []}
    for _ in range(args.rounds):
        for name, params in (("free", free), ("constrained", constrained)):
            rates[name].append(tokens / run_batch(sched, prompt, params, args.clients))
    f, c = statistics.median(rates["free"]), statistics.median(rates["constrained"])
    print(f"engine {sched.precision}, {args.clients} clients x {args.tokens} tokens, "
          f"{args.rounds} rounds (median tokens/s): free {f:.1f}, constrained {c:.1f}, "
          f"free/constrained {f / c:.2f}x")
    print("all rounds:", {k: [round(v, 1) for v in vs] for k, vs in rates.items()})
    sched.close()


if __name__ == "__main__":
    main()
