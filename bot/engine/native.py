"""The lean decode step's layer loop compiled from ``native.cpp``, where a C++ compiler is at hand.

A decoding step (one new token per request, no prompt chunk) spends a third of its time
at one row in the ~5,000 small tensor ops Python issues between the weight matmuls
(``bot bench --serve``'s step profile). ``native.cpp`` runs every decoder layer in one
call: the matmuls and LoRA products through ATen exactly as the Python step does, the
norms, rotary, cache writes and attention as plain loops.

Prompt chunks go through ATen's fused attention inside the same call.

It is built once per torch version, CPU capability and source with
``torch.utils.cpp_extension`` (about 35 s on 2 cores; the ``ninja`` package and the
system's C++ compiler) into ``$BOT_CACHE/native/``, and loaded from there afterwards.
Where the build fails (no compiler), ``BOT_NATIVE=off``, or the step needs something
the loop does not cover (int4 body weights, an activation other than SiLU, a GPU, steps
of over 512 tokens, scoring every position), the Python step runs: same results, slower.
``bot info`` says which.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

from bot import settings
from bot.util.assets import cache_dir, writable_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.cpp")
ENV = "BOT_NATIVE"
# -fopenmp: parallel loops on torch's OpenMP threads (the extension binds to the libgomp.so.1
# torch loaded, so there is one thread pool, not two)
BUILD = "-O3 -fopenmp"
_EMPTY = torch.empty(0)
_lock = threading.Lock()
_state: dict = {}


def _isa_flags() -> tuple[str, list[str]]:
    """The CPU capability torch dispatches to here and matching compiler flags.

    ``ATEN_CPU_CAPABILITY=avx2`` (an AVX2-only laptop, emulated) gives AVX2 code too.
    """
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return cap, ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx2", "-mfma"]
    if cap.startswith("AVX2"):
        return cap, ["-mavx2", "-mfma"]
    return cap, []


def _tag() -> tuple[str, list[str]]:
    """The build's name (capability and a digest of source, torch version and flags), flags."""
    cap, flags = _isa_flags()
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([torch.__version__, *flags, BUILD]).encode())
    return f"{cap.lower()}-{key.hexdigest()[:12]}", flags


def _off() -> bool:
    return (settings.get(ENV) or "auto").strip().lower() in ("0", "off", "no", "false")


def _build():
    from torch.utils.cpp_extension import load  # lazy: imports setuptools; only on first use

    tag, flags = _tag()
    folder = writable_cache_dir(f"native/{tag}")
    path = os.environ.get("PATH", "")
    try:
        import ninja  # lazy: only to put its binary on PATH for the build

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    except ImportError:
        pass
    try:
        if not any(folder.glob("*.so")):
            log.info("engine: building the native decode step once (about 35 s) in %s", folder)
        mod = load(name=f"bot_native_{tag.replace('-', '_')}", sources=[str(SOURCE)],
                   extra_cflags=[*BUILD.split(), *flags], extra_ldflags=["-fopenmp"],
                   build_directory=str(folder), verbose=False)
    finally:
        os.environ["PATH"] = path
    _prune(folder)
    return mod


def _prune(current: Path) -> None:
    """Remove this CPU capability's builds of other sources or torch versions (a few MB each).

    One build per capability is kept, so two torch versions sharing one ``BOT_CACHE``
    rebuild in turn (35 s each) rather than pile up folders."""
    cap = current.name.rsplit("-", 1)[0]
    for old in current.parent.glob(f"{cap}-*"):
        if old != current and old.is_dir():
            log.info("engine: removing an older build of the native decode step, %s", old)
            shutil.rmtree(old, ignore_errors=True)


def module():
    """The compiled module, or None (see :func:`reason`). Built or loaded once per process."""
    with _lock:
        if "module" not in _state:
            mod, why = None, ""
            if _off():
                why = f"turned off ({ENV}=off)"
            else:
                try:
                    mod = _build()
                except Exception as exc:  # no compiler, no ninja, a failed build: Python step
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
                    why = f"could not be built ({first})"
                    log.warning("engine: the native decode step %s; the Python step runs instead", why)
            _state.update(module=mod, reason=why)
        return _state["module"]


def reason() -> str:
    """Why the native step is not in use ('' when it is, or before the first try)."""
    return _state.get("reason", "")


def status() -> str:
    """One line for ``bot info``: whether decoding steps run the compiled loop (builds nothing)."""
    if _off():
        return f"off ({ENV}=off): decoding steps run in Python"
    if _state.get("module") is not None:
        return f"in use ({_state['module'].__file__})"
    if _state.get("reason"):
        return f"not in use: {_state['reason']}; decoding steps run in Python"
    folder = cache_dir() / "native" / _tag()[0]
    if any(folder.glob("*.so")):
        return f"built in {folder}; loaded by the first chat, demo or serve"
    return "not built yet: built by the first chat, demo or serve (about 35 s, with the system's C++ compiler)"


def weight_args(weights) -> list[torch.Tensor] | None:
    """``weights``' layers as the 16 tensors per layer ``decode_layers`` takes (cached on it).

    None when some layer's kernel is not one the loop runs (int4, fbgemm float16).
    """
    if not hasattr(weights, "native"):
        parts = [_linear_args(lin, weights.dtype) for layer in weights.layers for lin in layer]
        weights.native = None if None in parts else [t for p in parts for t in p]
    return weights.native


def _linear_args(lin, dtype: torch.dtype) -> list[torch.Tensor] | None:
    """(weight, scale or empty, bias or empty, corr or empty) of one fused linear, None if the
    loop cannot run it."""
    # by attributes (bot.engine.precision imports this module): Q8Call, Int8Call, _Dense
    if hasattr(lin, "corr"):
        return None if lin.padded else [lin.packed, lin.scale, _or_empty(lin.bias), lin.corr]
    if hasattr(lin, "qweight"):
        return [lin.qweight, lin.scale, _or_empty(lin.bias), _EMPTY] if lin.act == dtype else None
    if hasattr(lin, "weight") and hasattr(lin, "bias"):
        return [lin.weight, _EMPTY, _or_empty(lin.bias), _EMPTY]
    return None


def _or_empty(t: torch.Tensor | None) -> torch.Tensor:
    return _EMPTY if t is None else t


def lora_args(plan, n_layers: int, groups: int = 4) -> tuple[list[torch.Tensor], list[float]]:
    """One step's LoRA for ``decode_layers``: 3 tensors and a scale per (layer, group).

    A step on one adapter alone (a single chat) reuses the lists built for it before
    (``BankSet.native_cache``, emptied when adapters change); mixed steps build them.
    """
    if plan is None:
        return [], []
    cache = plan.banks.native_cache
    if plan.only is not None and plan.only in cache:
        return cache[plan.only]
    tensors: list[torch.Tensor] = []
    scales: list[float] = []
    for li in range(n_layers):
        for g in range(groups):
            parts = plan.native_part(li, g)
            if parts is None:
                tensors += [_EMPTY, _EMPTY, _EMPTY]
                scales.append(0.0)
            else:
                a_t, b, mask, scale = parts
                tensors += [a_t, b, _or_empty(mask)]
                scales.append(scale)
    if plan.only is not None:
        cache[plan.only] = (tensors, scales)
    return tensors, scales
