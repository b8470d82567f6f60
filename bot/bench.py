"""`bot bench`: speed and memory of the multi-adapter backbone, each figure beside its baseline.

Everything is measured in one run on one machine; ratios, not absolute numbers, are the
point (absolute tokens/s drift by +-20 % between runs on a shared 2-core VM).
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

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

    from .registry import load_all

    tasks, _ = load_all(bb, adapters_dir)
    names = list(tasks)
    for i, name in enumerate(["topic", "sentiment", "chat"]):
        if name not in names:
            torch.manual_seed(i)
            bb.add_adapter(name, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"]))
            names.append(name)
    return names


def measure_load(backbone_name) -> dict:
    from .backbone import Backbone, resolve_backbone

    with tempfile.TemporaryDirectory() as cold_cache:
        old = os.environ.get("BOT_CACHE")
        os.environ["BOT_CACHE"] = cold_cache
        try:
            t0 = time.perf_counter()
            Backbone.load(backbone_name)
            cold = time.perf_counter() - t0
        finally:
            if old is None:
                os.environ.pop("BOT_CACHE")
            else:
                os.environ["BOT_CACHE"] = old
    resolve_backbone(backbone_name)  # make sure the real cache exists (converts once if not)
    t0 = time.perf_counter()
    bb = Backbone.load(backbone_name)
    return {"cold": cold, "cached": time.perf_counter() - t0, "backbone": bb}


def measure_generation(bb, adapter: str, n: int) -> list[tuple]:
    """(label, tokens/s, agreement with fp32 greedy tokens) for each path."""
    ids = bb.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
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
    from .data import load_dialogue, split
    from .spec import AdapterSpec
    from .tasks.generate import GenerateTask, _shifted_nll

    test = split(load_dialogue(), seed=0).test
    rows = test[:: max(1, len(test) // n_rows)][:n_rows]  # spread over both corpora
    task = GenerateTask(AdapterSpec(name=adapter, kind="generate", template=""), bb)
    items = [task.encode_pair(r["prompt"], r["reply"], 128) for r in rows]
    out = []
    old = bb.compute_dtype
    bb.compute_dtype = torch.float32
    try:
        for label, runner in [("fp32 peft unmerged", lambda enc: bb.forward(enc, adapter).logits)] + [
            (f"fast path {m}", _engine_runner(bb, adapter, m)) for m in ("bf16", "w8")]:
            total, count = 0.0, 0
            with torch.inference_mode():
                for it in items:
                    enc = task._collate([it])
                    labels = enc.pop("labels")
                    total += float(_shifted_nll(runner(enc), labels).sum())
                    count += int((labels[:, 1:] != -100).sum())
            out.append((label, float(torch.exp(torch.tensor(total / count)))))
    finally:
        bb.compute_dtype = old
    return out


def _engine_runner(bb, adapter, mode):
    fast = bb.fast()
    fast.mode = mode
    model = fast.engine(adapter)
    return lambda enc: model(**enc).logits


def measure_mixed(bb, names: list[str], repeats: int = 10) -> tuple[float, float]:
    texts = [ANALYSIS_TEXT] * len(names)
    mixed = _median_time(lambda: bb.pooled(texts, names), repeats)
    seq = _median_time(lambda: [bb.pooled([t], [n]) for t, n in zip(texts, names)], repeats)
    return mixed, seq


def run_bench(args) -> int:
    from .info import rss_mb

    n = args.tokens
    print("measuring load times (cold load converts the GGUF into a temporary cache) ...")
    load = measure_load(args.backbone)
    bb = load["backbone"]
    rss0 = rss_mb()
    names = _ensure_adapters(bb, args.adapters_dir)
    gen_adapter = "chat" if "chat" in names else names[0]
    print("measuring generation ...")
    gen = measure_generation(bb, gen_adapter, n)
    print("measuring quality of the fast path ...")
    quality = measure_quality(bb, gen_adapter)
    print("measuring mixed batch ...")
    mixed_names = names[:3]
    mixed, seq = measure_mixed(bb, mixed_names)
    backbone_bytes = sum(p.numel() * p.element_size() for n_, p in bb.base.named_parameters()
                         if "lora_" not in n_)
    text = render(args, load, gen, quality, (mixed, seq, mixed_names), names, bb, backbone_bytes, rss0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


def render(args, load, gen, quality, mixed_info, names, bb, backbone_bytes, rss0) -> str:
    base_rate = gen[0][1]
    mixed, seq, mixed_names = mixed_info
    lines = [
        "# Benchmark", "",
        f"Command: `{args.command_line}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({_cpu_name()}), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}  ",
        f"Backbone: {bb.info.name} ({bb.num_parameters / 1e6:.1f} M parameters), fingerprint `{bb.fingerprint}`", "",
        "## Load", "", "| what | seconds | ratio |", "|---|---|---|",
        f"| cold: GGUF de-quantize + convert + load (baseline) | {load['cold']:.1f} | 1.00 |",
        f"| cached safetensors load | {load['cached']:.2f} | {load['cached'] / load['cold']:.3f} |", "",
        f"## Generation ({args.tokens}-token greedy reply, batch 1, median of 3)", "",
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


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
