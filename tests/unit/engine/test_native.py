"""bot.engine.native: the compiled decode loop gives the Python step's logits, and the engine
falls back to the Python step when the loop is off or cannot be built."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_backbone_with_generators

from bot.engine import native
from bot.engine.lean import LeanModel, Segment
from bot.engine.runner import make_runner
from bot.model.info import decode_line

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler on PATH: the native loop cannot be built")


@pytest.fixture
def bb():
    return tiny_backbone_with_generators()


def _runner(bb, kind):
    runner = make_runner(bb, kind, 6, 128)
    for name in ("a", "b"):
        runner.add_adapter(name)
    prompts = [[5, 9, 13, 2], [7, 7, 1, 30, 31, 2, 9], [3, 4], [11, 12, 13, 14, 15]]
    # prefill (prompt chunks: always the Python loop) in rows 0, 2, 3, 5
    runner.step([Segment(slot, 0, ids, None) for slot, ids in zip((0, 2, 3, 5), prompts)])
    return runner, {0: 4, 2: 7, 3: 2, 5: 5}


def _both(runner, segs, monkeypatch):
    """The same decode step through the Python loop and the compiled one (same cache state)."""
    calls = []
    real = LeanModel._native_layers
    monkeypatch.setattr(LeanModel, "_native_layers",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    runner.lean.native_ok = False
    py = runner.step(segs)
    runner.lean.native_ok = True
    compiled = runner.step(segs)  # writes the same keys/values at the same positions
    assert calls, "the compiled loop did not run"
    return py, compiled


@needs_compiler
@pytest.mark.parametrize("adapters", [(None, None, None, None), ("a", "a", "a", "a"),
                                      ("a", None, "b", "a")], ids=["base", "one-adapter", "mixed"])
def test_compiled_decode_step_gives_the_python_steps_logits_in_fp32(bb, adapters, monkeypatch):
    assert native.module() is not None, native.reason()
    runner, lengths = _runner(bb, "fp32")
    # rows out of order and not contiguous, each at its own length
    order = (3, 0, 5, 2)
    segs = [Segment(slot, lengths[slot], [20 + slot], a) for slot, a in zip(order, adapters)]
    py, compiled = _both(runner, segs, monkeypatch)
    assert py.shape == compiled.shape == (4, runner.lean.vocab)
    torch.testing.assert_close(compiled, py, atol=2e-4, rtol=1e-4)
    assert torch.equal(compiled.argmax(-1), py.argmax(-1))
    alone = runner.step([segs[2]])  # one row alone: the same row of the batch
    torch.testing.assert_close(alone[0], compiled[2], atol=2e-4, rtol=1e-4)


@needs_compiler
def test_compiled_step_with_prompt_chunks_gives_the_python_steps_logits(bb, monkeypatch):
    runner, lengths = _runner(bb, "fp32")
    segs = [Segment(3, lengths[3], [23], "b"), Segment(0, lengths[0], [20], None),
            Segment(1, 0, [40, 41, 42, 43, 44, 45], "a"),  # a new prompt's first chunk
            Segment(5, lengths[5], [50, 51, 52], None),  # a later chunk: cached prefix + causal
            Segment(4, 0, [60, 61, 62], "a", want=False)]  # a chunk whose logits are not wanted
    py, compiled = _both(runner, segs, monkeypatch)
    assert py.shape == compiled.shape == (4, runner.lean.vocab)
    torch.testing.assert_close(compiled, py, atol=2e-4, rtol=1e-4)


@needs_compiler
def test_compiled_decode_step_follows_the_int8_kernel(bb, monkeypatch):
    runner, lengths = _runner(bb, "w8")
    segs = [Segment(slot, lengths[slot], [20 + slot], a) for slot, a in zip((0, 2, 3), ("b", None, "a"))]
    py, compiled = _both(runner, segs, monkeypatch)
    # bf16 activations: the same kernels and roundings; float32 sums in another order
    torch.testing.assert_close(compiled, py, atol=0.05, rtol=0.02)


@needs_compiler
def test_the_engine_line_says_the_compiled_loop_is_in_use(bb):
    assert native.module() is not None
    assert "compiled decode loop: in use" in decode_line(bb)


_RUNTIMES = """
import json
from pathlib import Path

def runtimes():
    return sorted({l.split()[-1] for l in Path("/proc/self/maps").read_text().splitlines()
                   if "gomp" in l.split()[-1]})

import torch
torch.ones(64, 64) @ torch.ones(64, 64)
before = runtimes()
from bot.engine import native
assert native.module() is not None, native.reason()
print(json.dumps([before, runtimes()]))
"""


@needs_compiler
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_the_loop_shares_torchs_openmp_runtime():
    """Built with -fopenmp, it must bind to the libgomp torch loaded: one thread pool, not two.

    In a fresh process (other libraries, e.g. scikit-learn, bring their own libgomp)."""
    native.module()  # built here first, so the child only loads it
    out = subprocess.run([sys.executable, "-c", _RUNTIMES], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    before, after = json.loads(out.strip().splitlines()[-1])
    assert len(before) == 1 and "torch" in before[0], before
    assert after == before


@needs_compiler
def test_a_failing_compiled_call_is_redone_in_python_and_the_loop_stays_off(bb, monkeypatch, caplog):
    runner, lengths = _runner(bb, "fp32")
    segs = [Segment(0, lengths[0], [20], "a"), Segment(2, lengths[2], [22], None)]
    runner.lean.native_ok = False
    expected = runner.step(segs)
    runner.lean.native_ok = True

    def broken(self, compiled, x, *args):
        x.mul_(3)  # damage the input, as a half-done call could
        raise RuntimeError("simulated failure inside the compiled loop")
    monkeypatch.setattr(LeanModel, "_native_layers", broken)
    got = runner.step(segs)
    torch.testing.assert_close(got, expected)
    assert runner.lean.native_ok is False
    assert "simulated failure" in caplog.text


def test_off_runs_the_python_step_and_says_so(bb, monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("BOT_NATIVE", "off")
    assert native.module() is None
    assert "BOT_NATIVE=off" in native.reason() and "BOT_NATIVE=off" in decode_line(bb)
    runner, lengths = _runner(bb, "fp32")
    called = []
    monkeypatch.setattr(LeanModel, "_native_layers", lambda *a, **k: called.append(1))
    out = runner.step([Segment(0, lengths[0], [21], "a")])
    assert out.shape == (1, runner.lean.vocab) and not called


def test_a_failed_build_falls_back_with_the_compilers_reason(monkeypatch, tmp_path):
    broken = tmp_path / "native.cpp"
    broken.write_text('#error "deliberately broken"\n')
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setenv("BOT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BOT_NATIVE", "auto")
    assert native.module() is None
    assert native.reason().startswith("could not be built")
    assert "Python" in native.status()


def test_a_new_build_removes_older_builds_of_the_same_capability(tmp_path):
    current = tmp_path / "avx512-aaaaaaaaaaaa"
    for name in ("avx512-aaaaaaaaaaaa", "avx512-bbbbbbbbbbbb", "avx2-cccccccccccc"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.so").write_bytes(b"")
    native._prune(current)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avx2-cccccccccccc", "avx512-aaaaaaaaaaaa"]


_AVX2_STEP = """
import json, torch
from helpers import tiny_backbone_with_generators
from bot.engine import native
from bot.engine.lean import Segment
from bot.engine.runner import make_runner
assert native.module() is not None, native.reason()
bb = tiny_backbone_with_generators()
runner = make_runner(bb, "fp32", 6, 128)
runner.add_adapter("a")
runner.step([Segment(0, 0, list(range(5, 45)), None), Segment(2, 0, [7, 7, 1, 30], "a")])
segs = [Segment(2, 4, [20], "a"), Segment(0, 40, [21], None)]
runner.lean.native_ok = False
py = runner.step(segs)
runner.lean.native_ok = True
compiled = runner.step(segs)
print(json.dumps({"isa": torch.backends.cpu.get_cpu_capability(), "native_ok": runner.lean.native_ok,
                  "diff": float((compiled - py).abs().max())}))
"""


@needs_compiler
def test_the_avx2_build_gives_the_python_steps_logits():
    """The AVX2 build's SIMD attention and q8-free fp32 step, in a fresh process built for AVX2."""
    here = Path(__file__).resolve()
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "PYTHONPATH": os.pathsep.join([str(here.parents[2]), str(here.parents[3]), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _AVX2_STEP], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["isa"] == "AVX2" and result["native_ok"]
    assert result["diff"] < 2e-4
