"""Time one linear layer at batch 1 under each kernel (the figures in bot/engine/precision.py's docstring).

    python scripts/kernel_layers.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python scripts/kernel_layers.py

Shapes are the embedded backbone's (SmolLM2-135M): q/k/v fused, gate/up fused, down, and
the 49152 x 576 output head. Each figure is the mean of 200 calls after 20 warm-up calls,
with the weights warm in cache (a decode step reads each layer once, so absolute times in a
real step are higher; compare kernels, not seconds).
"""

from __future__ import annotations

import os
import time
import warnings

import torch

from bot.engine.precision import Float16WeightLinear, Int8WeightLinear

SHAPES = [(960, 576), (3072, 576), (576, 1536), (49152, 576)]


def per_call_us(fn, n: int = 200) -> float:
    for _ in range(20):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    isa = os.environ.get("ATEN_CPU_CAPABILITY", "native")
    print(f"ISA: {isa}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f) * 0.02
        x = torch.randn(1, in_f)
        w8 = Int8WeightLinear(w, None, torch.bfloat16)
        f16 = Float16WeightLinear(w, None)
        wb, xb = w.bfloat16(), x.bfloat16()
        with torch.inference_mode():
            times = {"fp32": per_call_us(lambda x=x, w=w: torch.nn.functional.linear(x, w)),
                     "bf16": per_call_us(lambda xb=xb, wb=wb: torch.nn.functional.linear(xb, wb)),
                     "int8 weight-only (w8)": per_call_us(lambda w8=w8, xb=xb: w8(xb)),
                     "fp16 weights, fbgemm": per_call_us(lambda f16=f16, x=x: f16(x))}
            ref = x @ w.T
            err = float((f16(x) - ref).norm() / ref.norm())
        cells = ", ".join(f"{k} {v:.1f} us" for k, v in times.items())
        print(f"{out_f} x {in_f}: {cells}; fp16 relative error {err:.1e}")


if __name__ == "__main__":
    main()
