"""`bot info`: what is loaded, from where, how fast, and what it costs in memory.

Also the one description of the machine that reports and metrics files record.
"""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path

import torch

from bot.engine import native
from bot.engine.lean import SUPPORTED, why_not
from bot.engine.llamacpp import import_llama_cpp, source_gguf
from bot.engine.precision import DESCRIPTIONS
from bot.engine.tuning import choose, cpu_features
from bot.manifests.registry import load_all
from bot.model.backbone import Backbone
from bot.settings import describe


def rss_mb() -> float:
    """Resident memory of this process in MB (Linux /proc; falls back to peak RSS)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """e.g. ``x86_64, 2 CPU cores (AMD EPYC 7B13), torch 2.13.0+cpu``: recorded beside every figure."""
    return f"{platform.machine()}, {os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__}"


def backbone_info(*, adapters_dir: str | Path, backbone: str | None = None, device: str | None = None,
                  load_in: str | None = None) -> str:
    """A plain-text summary of the backbone and the adapters under ``adapters_dir``.

    Args:
        adapters_dir: folder holding ``<name>/adapter.yaml``.
        backbone: backbone name, folder, .gguf file or hub id (None: the embedded default).
        device: auto|cpu|cuda|mps (None: $BOT_DEVICE or auto).
        load_in: weight precision auto|fp32|bf16|8bit|4bit (None: $BOT_LOAD_IN or auto).
    """
    before = rss_mb()
    bb = Backbone.load(backbone, device=device, load_in=load_in)
    after_backbone = rss_mb()
    tasks, failures = load_all(bb, adapters_dir)
    lines = [
        f"backbone     {bb.info.name}",
        f"loaded from  {bb.info.source}",
        f"load time    {bb.info.seconds:.2f} s" + ("  (first run: converted GGUF into the cache)" if bb.info.converted else ""),
        f"parameters   {bb.num_parameters / 1e6:.1f} M",
        f"fingerprint  {bb.fingerprint}",
        f"device       {bb.device}",
        f"compute      {str(bb.compute_dtype).replace('torch.', '')} (autocast; weights {bb.load_in})",
        f"memory       {rss_mb():.0f} MB resident (backbone added {after_backbone - before:.0f} MB)",
        f"adapters     {len(tasks)} loaded from {adapters_dir}",
    ]
    for name, task in tasks.items():
        lines.append(f"  - {name:12s} {task.kind:9s} {bb.adapter_nbytes(name) / 1e6:6.2f} MB  {task.spec.description}")
    for name, err in failures.items():
        lines.append(f"  ! {name:12s} not loaded: {err}")
    return "\n".join(lines + kernel_lines(bb) + settings_lines())


def settings_lines() -> list[str]:
    """Every BOT_* environment variable (bot.settings) with the value in effect."""
    rows = describe()
    width = max(len(name) for name, _, _ in rows)
    return ["settings     (environment variables; bot/settings.py)"] + [
        f"  {name:{width}s} = {value}: {meaning}" for name, value, meaning in rows]


def decode_line(bb) -> str:
    """Which step the engine runs for this backbone: the lean batched step or transformers'."""
    reason = why_not(bb.base)
    if not reason:
        return ("lean batched step (bot.engine.lean: fused matmuls, per-row KV cache, stacked "
                f"LoRA per token, chunked prefill); compiled decode loop: {native.status()}")
    return f"transformers forward (no lean step for {reason}; the lean step covers {', '.join(SUPPORTED)})"


def kernel_lines(bb) -> list[str]:
    """What generation runs with here, and why (measured on first use, then cached)."""
    f = cpu_features()
    choice = choose(bb)
    kinds = dict.fromkeys((choice.small, choice.large))
    what = "; ".join(f"{k} = {DESCRIPTIONS[k]}" for k in kinds)
    if len(kinds) == 2:
        what = f"{choice.small} up to {choice.threshold} tokens per step, {choice.large} above ({what})"
    lines = [f"cpu          {cpu_name()}: ATen kernels {f['aten_capability']}, native bf16 {f['native_bf16']}",
             f"generation   {what}",
             f"  why        {choice.reason}",
             f"  cache      {'reused' if choice.cached else 'measured now and saved'}, key {choice.key}",
             f"  decode     {decode_line(bb)}"]
    if import_llama_cpp() is None:
        lines.append("llama.cpp    not installed (optional: pip install -e '.[llamacpp]')")
    else:
        gguf = source_gguf(bb)
        lines.append(f"llama.cpp    installed; base file {gguf or 'none (backbone not loaded from a GGUF file)'}")
    return lines
