"""`bot bench`: speed and memory of the multi-adapter backbone, each figure beside its baseline.

Everything is measured in one run on one machine; ratios, not absolute numbers, are the
point (absolute tokens/s drift between runs on a shared VM).
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..fsutil import atomic_write_text
from ..info import machine, rss_mb
from ..spec import DEFAULT_TARGET_MODULES

log = logging.getLogger(__name__)

PROMPT = "Tell me something interesting about the ocean."
ANALYSIS_TEXT = "The new phone's battery died after one day, what a disappointment."


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _tokens_per_s(model_generate, ids, n: int, repeats: int = 3) -> tuple[float, torch.Tensor]:
    out = {}

    def run():
        out["ids"] = model_generate(ids, n)

    seconds = _median_time(run, repeats)
    return n / seconds, out["ids"]


def _hf_generate(model):
    def gen(ids, n):
        with torch.inference_mode():
            res = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        return res[0, ids.shape[1]:]
    return gen


def _ensure_adapters(bb, adapters_dir) -> list[str]:
    """Trained adapters when present; otherwise random LoRA adapters of the same shape."""
    from peft import LoraConfig

    from ..registry import load_all

    tasks, _ = load_all(bb, adapters_dir)
    names = list(tasks)
    for i, name in enumerate(["topic", "sentiment", "chat"]):
        if name not in names:
            torch.manual_seed(i)
            bb.add_adapter(name, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                            target_modules=list(DEFAULT_TARGET_MODULES)))
            names.append(name)
    return names


def measure_load(backbone_name, device=None, load_in=None) -> dict:
    from ..backbone import Backbone, resolve_backbone

    with tempfile.TemporaryDirectory() as cold_cache:
        old = os.environ.get("BOT_CACHE")
        os.environ["BOT_CACHE"] = cold_cache
        try:
            t0 = time.perf_counter()
            Backbone.load(backbone_name, device=device, load_in=load_in)
            cold = time.perf_counter() - t0
        finally:
            if old is None:
                os.environ.pop("BOT_CACHE")
            else:
                os.environ["BOT_CACHE"] = old
    resolve_backbone(backbone_name)  # make sure the real cache exists (converts once if not)
    t0 = time.perf_counter()
    bb = Backbone.load(backbone_name, device=device, load_in=load_in)
    return {"cold": cold, "cached": time.perf_counter() - t0, "backbone": bb}


def measure_generation(bb, adapter: str, n: int) -> list[tuple]:
    """(label, tokens/s, agreement with fp32 greedy tokens) for each path."""
    ids = bb.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"].to(bb.device)
    fast = bb.fast()
    rows = []
    fast.mode = "fp32"
    base_rate, base_ids = _tokens_per_s(_hf_generate(fast.engine(None)), ids, n)
    rows.append(("base model, plain transformers fp32 (baseline)", base_rate, None))
    with bb.lock:
        bb.peft.set_adapter(adapter)
        naive_rate, naive_ids = _tokens_per_s(_hf_generate(bb.peft), ids, n)
    rows.append((f"'{adapter}' adapter, naive peft unmerged fp32", naive_rate, None))
    for mode in ("bf16", "w8"):
        fast.mode = mode
        r_base, ids_b = _tokens_per_s(_hf_generate(fast.engine(None)), ids, n)
        r_ad, ids_a = _tokens_per_s(_hf_generate(fast.engine(adapter)), ids, n)
        rows.append((f"base model, fast path {mode}", r_base, _agree(ids_b, base_ids)))
        rows.append((f"'{adapter}' adapter, fast path {mode} (merged)", r_ad, _agree(ids_a, naive_ids)))
    fast.mode = "w8"
    return rows


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of positions up to the first differing greedy token (1.0 = identical)."""
    same = (a == b).int().tolist()
    return (same.index(0) if 0 in same else len(same)) / len(same)


def measure_quality(bb, adapter: str, n_rows: int = 60) -> list[tuple]:
    """Held-out reply perplexity of the chat adapter: fp32 peft vs each fast engine."""
    from ..data import load_dialogue, split
    from ..spec import AdapterSpec
    from ..tasks.generate import GenerateTask

    test = split(load_dialogue(), seed=0).test
    rows = test[:: max(1, len(test) // n_rows)][:n_rows]  # spread over both corpora
    task = GenerateTask(AdapterSpec(name=adapter, kind="generate", template=""), bb)
    out = []
    old = bb.compute_dtype
    bb.compute_dtype = torch.float32
    try:
        out.append(("fp32 peft unmerged", task.perplexity(rows, batch_size=1)))
        for mode in ("bf16", "w8"):
            out.append((f"fast path {mode}",
                        task.perplexity(rows, batch_size=1, logits=_engine_runner(bb, adapter, mode))))
    finally:
        bb.compute_dtype = old
    return out


def _engine_runner(bb, adapter, mode):
    fast = bb.fast()
    fast.mode = mode
    model = fast.engine(adapter)
    return lambda enc: model(**{k: v.to(bb.device) for k, v in enc.items()}).logits


def measure_mixed(bb, names: list[str], repeats: int = 10) -> tuple[float, float]:
    texts = [ANALYSIS_TEXT] * len(names)
    mixed = _median_time(lambda: bb.pooled(texts, names), repeats)
    seq = _median_time(lambda: [bb.pooled([t], [n]) for t, n in zip(texts, names)], repeats)
    return mixed, seq


def run_bench(*, adapters_dir: str | Path, backbone: str | None = None, out: str | Path = "reports/bench.md",
              tokens: int = 64, command_line: str = "", device: str | None = None,
              load_in: str | None = None) -> str:
    """Measure load, generation, fast-path quality, mixed batches and memory; write ``out``.

    Args:
        adapters_dir: folder with trained adapters (missing defaults get random LoRA weights).
        backbone: backbone name, folder, .gguf file or hub id (None: the embedded default).
        out: markdown file to write.
        tokens: length of the greedy reply that is timed.
        command_line: recorded in the report.
        device: auto|cpu|cuda|mps (None: $BOT_DEVICE or auto).
        load_in: weight precision auto|fp32|bf16|8bit|4bit (None: $BOT_LOAD_IN or auto).

    Returns:
        the markdown that was written.
    """
    log.info("measuring load times (cold load converts the GGUF into a temporary cache) ...")
    load = measure_load(backbone, device=device, load_in=load_in)
    bb = load["backbone"]
    rss0 = rss_mb()
    names = _ensure_adapters(bb, adapters_dir)
    gen_adapter = "chat" if "chat" in names else names[0]
    log.info("measuring generation ...")
    gen = measure_generation(bb, gen_adapter, tokens)
    log.info("measuring quality of the fast path ...")
    quality = measure_quality(bb, gen_adapter)
    log.info("measuring mixed batch ...")
    mixed_names = names[:3]
    mixed, seq = measure_mixed(bb, mixed_names)
    backbone_bytes = sum(p.numel() * p.element_size() for n_, p in bb.base.named_parameters()
                         if "lora_" not in n_)
    text = render(command_line=command_line, tokens=tokens, load=load, gen=gen, quality=quality,
                  mixed_info=(mixed, seq, mixed_names), names=names, bb=bb,
                  backbone_bytes=backbone_bytes, rss0=rss0)
    atomic_write_text(Path(out), text)
    return text


def render(*, command_line: str, tokens: int, load: dict, gen: list, quality: list, mixed_info: tuple,
           names: list[str], bb, backbone_bytes: int, rss0: float) -> str:
    """The benchmark markdown from the measured figures (see ``run_bench``)."""
    base_rate = gen[0][1]
    mixed, seq, mixed_names = mixed_info
    lines = [
        "# Benchmark", "",
        f"Command: `{command_line}`  ",
        f"Machine: {machine()}, {time.strftime('%Y-%m-%d')}  ",
        f"Backbone: {bb.info.name} ({bb.num_parameters / 1e6:.1f} M parameters), fingerprint `{bb.fingerprint}`", "",
        "## Load", "", "| what | seconds | ratio |", "|---|---|---|",
        f"| cold: GGUF de-quantize + convert + load (baseline) | {load['cold']:.1f} | 1.00 |",
        f"| cached safetensors load | {load['cached']:.2f} | {load['cached'] / load['cold']:.3f} |", "",
        f"## Generation ({tokens}-token greedy reply, batch 1, median of 3)", "",
        "| path | tokens/s | × base fp32 | greedy tokens identical to fp32 (prefix) |", "|---|---|---|---|",
    ]
    for label, rate, agree in gen:
        lines.append(f"| {label} | {rate:.1f} | {rate / base_rate:.2f} | {'' if agree is None else f'{agree:.0%}'} |")
    lines += ["", f"Held-out reply perplexity of '{names[-1] if 'chat' not in names else 'chat'}' "
              "(60 dialogue test pairs; the accuracy check for the fast path):", "",
              "| path | perplexity | × fp32 |", "|---|---|---|"]
    for label, ppl in quality:
        lines.append(f"| {label} | {ppl:.2f} | {ppl / quality[0][1]:.3f} |")
    lines += ["", f"## Mixed batch ({len(mixed_names)} adapters: {', '.join(mixed_names)}; one short message)", "",
              "| path | ms (median of 10) | ratio |", "|---|---|---|",
              f"| {len(mixed_names)} sequential calls (baseline) | {seq * 1000:.0f} | 1.00 |",
              f"| one mixed-adapter batch | {mixed * 1000:.0f} | {mixed / seq:.2f} |", "",
              "## Memory", "", "| what | MB | share of backbone weights |", "|---|---|---|",
              f"| backbone weights (fp32) | {backbone_bytes / 1e6:.0f} | 1.000 |"]
    for name in names:
        nb = bb.adapter_nbytes(name)
        lines.append(f"| adapter '{name}' LoRA tensors | {nb / 1e6:.2f} | {nb / backbone_bytes:.4f} |")
    lines += [f"| process resident memory after loading backbone | {rss0:.0f} | |", "",
              "Fast path = adapter merged into a private copy of the weights (built once, cached), then "
              "int8 weight-only (w8) or bfloat16; see bot/fastgen.py. Each cached engine costs about "
              f"{_engine_mb(bb):.0f} MB in w8.", ""]
    return "\n".join(lines)


def _engine_mb(bb) -> float:
    fast = bb.fast()
    eng = next(iter(fast._engines.values()), None)
    if eng is None:
        return 0.0
    return sum(t.numel() * t.element_size() for t in list(eng.parameters()) + list(eng.buffers())) / 1e6
