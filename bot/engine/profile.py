"""Where one engine step's time goes: the step profiled with torch.profiler, by kind of work.

``bot bench --serve`` writes this beside its targets, so a target that is not met comes with
what the time is spent on. A decode batch of ``rows`` requests (each at ``context`` tokens
of history, every other one on a generation adapter when one is loaded) is stepped
``steps`` times under ``torch.profiler``; each op's self CPU time goes to one bucket:

* ``body``: the decoder's weight matmuls in the step's kernel (int8/int4 weight-only
  kernels, the compiled loop's int8 x int8 ``bot::q8_linear``, bf16/float32
  ``mm``/``addmm`` over the hidden or MLP width);
* ``head``: the output head (a matmul with the vocabulary as a dimension, or fbgemm's
  float16 linear);
* ``lora``: the stacked LoRA products (a matmul over the adapters' stacked rank columns)
  and the add of their result;
* ``attention``: the scores and weighted sums (batched matmuls, fused attention,
  softmax; in the compiled decode loop its attention and its rotary-and-cache-write
  loops) and the cache writes;
* ``other``: everything else, with the number of op calls per step (norms, casts,
  rotary, slicing: the Python-driven glue between the kernels).

Self times are per op (children excluded), so the buckets add up to the profiled total.
The profiler adds a few microseconds per op, so ``other`` reads a little high.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from bot.engine.lean import Segment

BUCKETS = ("body", "head", "lora", "attention", "other")
# bot::* ops: the compiled decode loop's (bot/engine/native.cpp); its score exp is aten::exp_
_ATTENTION = ("bmm", "scaled_dot_product", "softmax", "index_copy", "bot::attention",
              "bot::rotary_cache_write", "aten::exp_")
_BODY_KERNELS = ("_weight_int8pack_mm", "_weight_int4pack_mm")
_MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::linear", "aten::matmul")


def bucket(name: str, shapes: list, vocab: int, rank: int) -> str:
    """The bucket of one op from its name and input shapes (see the module docstring).

    ``rank``: the widest stack of LoRA columns the runner holds (0 without adapters); a
    matmul whose 2-D input ends in at most that many columns is a LoRA product.
    """
    mats = [s for s in shapes if isinstance(s, (list, tuple)) and s and all(isinstance(d, int) for d in s)]
    if name == "bot::q8_linear":  # int8 x int8; its weights are packed (outputs / 16, ...)
        return "head" if any(len(s) == 4 and s[0] * 16 == vocab for s in mats) else "body"
    if "linear_dynamic_fp16" in name or any(vocab in s for s in mats):
        return "head"
    if any(k in name for k in _BODY_KERNELS):
        return "body"
    if any(k in name for k in _ATTENTION):
        return "attention"
    if name in _MATMULS:
        if any(len(s) > 2 for s in mats):
            return "attention"  # per-row score products over the cache
        return "lora" if any(len(s) == 2 and s[1] <= rank for s in mats) else "body"
    return "other"


def step_profile(runner, rows: int, *, context: int = 150, adapter: str | None = None,
                 steps: int = 10) -> dict:
    """Profile ``steps`` decode steps of ``rows`` requests on a lean runner.

    Args:
        runner: a bot.engine.runner.LeanRunner (its cache must hold ``rows`` rows).
        rows: decoding requests in the batch.
        context: tokens each request has seen (the attention width).
        adapter: a served generation adapter for every other row (None: base only).
        steps: profiled steps (after two warm-up steps).

    Returns:
        {"rows", "context", "adapter", "kernel", "step_ms" (wall, unprofiled, median of
        ``steps``), "profiled_ms" (self CPU per step), "ms": {bucket: ms per step},
        "ops_per_step": {bucket: calls per step}}.
    """
    segs = [Segment(i, context, [42 + i], adapter if i % 2 == 0 else None) for i in range(rows)]
    vocab = runner.lean.vocab
    rank = runner.banks.widest_stack()
    with torch.inference_mode():
        for _ in range(2):
            runner.step(segs)
        walls = []
        for _ in range(steps):
            t0 = time.perf_counter()
            runner.step(segs)
            walls.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                runner.step(segs)
    ms = dict.fromkeys(BUCKETS, 0.0)
    ops = dict.fromkeys(BUCKETS, 0)
    for ev in prof.key_averages(group_by_input_shape=True):
        b = bucket(ev.key, ev.input_shapes or [], vocab, rank)
        ms[b] += ev.self_cpu_time_total / 1000 / steps
        ops[b] += ev.count
    walls.sort()
    return {"rows": rows, "context": context, "adapter": adapter, "kernel": runner.kind_for(rows),
            "step_ms": round(1000 * walls[len(walls) // 2], 2),
            "profiled_ms": round(sum(ms.values()), 2),
            "ms": {k: round(v, 2) for k, v in ms.items()},
            "ops_per_step": {k: round(v / steps) for k, v in ops.items()}}


def render_profile(profiles: list[dict]) -> list[str]:
    """Markdown lines: one row per profiled batch size."""
    lines = ["| decode rows | kernel | step ms (wall) | profiled ms | "
             + " | ".join(f"{b} ms" for b in BUCKETS)
             + " | dispatcher calls per step (other / all; nested calls counted) |",
             "|---|---|---|---|" + "---|" * len(BUCKETS) + "---|"]
    for p in profiles:
        cells = [f"{p['ms'][b]} ({p['ms'][b] / p['profiled_ms']:.0%})" if p["profiled_ms"] else "0"
                 for b in BUCKETS]
        total_ops = sum(p["ops_per_step"].values())
        lines.append(f"| {p['rows']} | {p['kernel']} | {p['step_ms']} | {p['profiled_ms']} | "
                     + " | ".join(cells) + f" | {p['ops_per_step']['other']} / {total_ops} |")
    return lines
