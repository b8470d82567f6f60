"""The int8 x int8 kernel (``q8``): its sums equal an exact reference of the same
quantization, on this CPU's path and on the AVX2 path, and the engine runs it in both loops."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import make_tiny_model, tiny_backbone_with_generators

from bot.engine import native
from bot.engine.lean import LeanModel, Segment
from bot.engine.precision import Q8Call, Q8Linear, convert
from bot.engine.profile import bucket
from bot.engine.runner import make_runner

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler on PATH: the q8 kernel is in the compiled loop")


def reference(call: Q8Call, x: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in float64 from its packed tensors: x quantized in blocks of
    32 (scale amax / 127, round half to even), integer block sums, scaled per block."""
    nb, kq = call.packed.shape[:2]
    rows, cols = nb * 16, kq * 4
    q = call.packed.permute(0, 2, 1, 3).reshape(rows, cols).double()
    sw = call.scale.permute(0, 2, 1).reshape(rows, cols // 32).double()
    xb = torch.nn.functional.pad(x.float(), (0, cols - x.shape[1])).view(x.shape[0], cols // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))  # float32, as the kernel
    xq = torch.round(xb * inv).clamp(-127, 127).double()
    sx = (amax / 127.0).double().squeeze(-1)
    dots = torch.einsum("mbk,nbk->mnb", xq, q.view(rows, cols // 32, 32))
    y = (dots * sw.unsqueeze(0) * sx.unsqueeze(1)).sum(-1)
    if call.bias is not None:
        y = y + call.bias.double()
    return y[:, :call.out_features]


SHAPES = [(48, 64, True), (32, 96, False), (40, 70, True)]  # the last pads both outputs and inputs


def _cases():
    torch.manual_seed(0)
    for n, k, with_bias in SHAPES:
        w = torch.randn(n, k) * 0.05
        w[3, 5] = 0.9  # an outlier weight: its block gets its own scale
        call = Q8Call(w, torch.randn(n) if with_bias else None)
        for m in (1, 2, 3, 4, 5, 17):
            x = torch.randn(m, k)
            x[:, 1] *= 40  # an outlier activation column
            x[0, 32:64] = 0  # an all-zero block
            yield w, call, x


def test_q8_sums_equal_the_exact_reference_and_stay_close_to_float32():
    assert native.module() is not None, native.reason()
    for w, call, x in _cases():
        y = call(x)
        assert y.shape == (x.shape[0], w.shape[0]) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), reference(call, x), rtol=1e-5, atol=1e-4)
        exact = x @ w.T + (call.bias[:w.shape[0]] if call.bias is not None else 0)
        assert ((y - exact).norm() / exact.norm()) < 0.03


_AVX2 = """
import json, torch
from bot.engine import native
mod = native.module()
assert mod is not None, native.reason()
import test_q8
worst = 0.0
for w, call, x in test_q8._cases():
    ref = test_q8.reference(call, x)
    worst = max(worst, float(((call(x).double() - ref).abs() / (ref.abs() + 1e-3)).max()))
print(json.dumps({"kernel": mod.q8_kernel(), "worst": worst}))
"""


def test_the_avx2_path_gives_the_same_sums():
    """What an AVX2-only laptop runs (vpmaddubsw), in a fresh process built for AVX2."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.path.dirname(os.path.dirname(
               os.path.dirname(__file__))), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _AVX2], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kernel"] == "avx2"
    assert result["worst"] < 1e-4


def test_the_engine_runs_q8_in_both_loops(monkeypatch):
    bb = tiny_backbone_with_generators()
    runner = make_runner(bb, "q8", 4, 64)
    runner.add_adapter("a")
    runner.step([Segment(0, 0, [5, 9, 13, 2], None), Segment(1, 0, [7, 7, 1], "a")])
    calls = []
    real = LeanModel._native_layers
    monkeypatch.setattr(LeanModel, "_native_layers", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    segs = [Segment(0, 4, [20], "a"), Segment(1, 3, [21], None)]
    runner.lean.native_ok = False
    py = runner.step(segs)
    runner.lean.native_ok = True
    compiled = runner.step(segs)
    assert calls, "the compiled loop did not run the q8 weights"
    # the same kernel in both; only the attention's float32 sums differ in order
    torch.testing.assert_close(compiled, py, atol=1e-3, rtol=1e-3)
    ref = make_runner(bb, "fp32", 4, 64)
    ref.add_adapter("a")
    ref.step([Segment(0, 0, [5, 9, 13, 2], None), Segment(1, 0, [7, 7, 1], "a")])
    exact = ref.step(segs)
    assert float((compiled - exact).norm() / exact.norm()) < 0.05


def test_convert_puts_q8_layers_in_a_model_and_keeps_its_outputs():
    model = make_tiny_model(hidden=64)
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        convert(model, "q8")
        after = model(input_ids=ids).logits
    assert any(isinstance(m, Q8Linear) for m in model.modules())
    assert torch.equal(before.argmax(-1), after.argmax(-1))
    assert float((after - before).norm() / before.norm()) < 0.05


def test_the_profile_counts_q8_matmuls_as_body_or_head():
    assert bucket("bot::q8_linear", [[16, 576], [60, 144, 16, 4]], 49152, 8) == "body"
    assert bucket("bot::q8_linear", [[16, 576], [3072, 144, 16, 4]], 49152, 8) == "head"
