"""Time the lean step with and without the compiled loop (bot/engine/native.cpp), same run.

    python scripts/native_step.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python scripts/native_step.py
    python scripts/native_step.py --against w8,bf16h   # two kernel choices, both compiled

On the embedded backbone in the kernels `bot serve` picks here: decode steps of 1, 4 and 16
rows (each row at 150 tokens of history, every other row on a random rank-8 adapter when
``--lora`` is given), and one mixed step (8 decoding rows plus a 128-token prompt chunk).
The two paths alternate, 7 rounds of 5 steps each; the median step is printed with the
ratio. ``--against SMALL,LARGE`` compares kernels instead: the compiled loop in the kernels
``bot serve`` picks against the same loop in the kernels named (e.g. the int8 weight-only
and bf16 pair picked before the q8 kernel existed). (Their logits are equal in float32, tested; in the reduced-precision kernels they
differ by rounding, and the quality check is the decode perplexity of
tests/integration/test_native_real.py.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bot.engine.lean import Segment
from bot.engine.runner import make_runner
from bot.model.backbone import Backbone

CASES = {"1 row": (1, 0), "4 rows": (4, 0), "16 rows": (16, 0), "8 rows + 128-token chunk": (8, 128)}


def _segments(rows: int, chunk: int, adapter: str | None) -> list[Segment]:
    segs = [Segment(i, 150, [42 + i], adapter if i % 2 == 0 else None) for i in range(rows)]
    if chunk:
        segs.append(Segment(rows, 0, list(range(100, 100 + chunk)), None))
    return segs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora", action="store_true", help="put a random rank-8 adapter on every other row")
    ap.add_argument("--against", metavar="SMALL,LARGE", help="compare the picked kernels with these, both compiled")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    bb = Backbone.load()
    adapter = None
    if args.lora:
        from peft import LoraConfig  # lazy: only with --lora

        from bot.model.families import DEFAULT_TARGET_MODULES

        torch.manual_seed(0)
        bb.add_adapter("probe", LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                           target_modules=list(DEFAULT_TARGET_MODULES)))
        adapter = "probe"
    runner = make_runner(bb, "auto", 16, 2048)
    other = make_runner(bb, args.against, 16, 2048) if args.against else None
    for r in (runner, other):
        if r is not None and adapter:
            r.add_adapter(adapter)
    print(f"{runner.describe()}; compiled loop: {runner.lean.native_ok and 'available' or 'not available'}")
    if other is None:
        print("| step | kernel | Python loop ms | compiled loop ms | speed-up |")
    else:
        print("| step | other kernel | its ms | picked kernel | its ms | speed-up |")
    print("|---|---|---|---|---|" + ("" if other is None else "---|"))
    for name, (rows, chunk) in CASES.items():
        segs = _segments(rows, chunk, adapter)
        times: dict[bool, list[float]] = {False: [], True: []}
        with torch.inference_mode():
            for _ in range(7):
                for mine in (False, True):
                    r = runner if mine or other is None else other
                    if other is None:
                        runner.lean.native_ok = mine
                    r.step(segs)
                    t0 = time.perf_counter()
                    for _ in range(5):
                        r.step(segs)
                    times[mine].append((time.perf_counter() - t0) / 5)
        before, after = (1000 * statistics.median(times[c]) for c in (False, True))
        kind = runner.kind_for(rows + chunk)
        if other is None:
            print(f"| {name} | {kind} | {before:.2f} | {after:.2f} | {before / after:.2f}x |")
        else:
            print(f"| {name} | {other.kind_for(rows + chunk)} | {before:.2f} | {kind} | {after:.2f} | "
                  f"{before / after:.2f}x |")


if __name__ == "__main__":
    main()
