"""`bot bench`: speed and memory of the multi-adapter backbone, each figure beside its baseline.

Every row is measured twice, each time in a fresh child process: as the machine is, and
with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (PyTorch's kernels limited to
AVX2, as on most laptops). Each child records the CPU features it ran with, measures the
kernel choice afresh (bot.engine.tuning), times a greedy reply of exactly ``tokens`` new tokens
on every path, and, when llama-cpp-python is importable, llama.cpp on the same GGUF file
with the same prompt ids in the same run. Ratios within one run are the point (absolute
tokens/s drift between runs on a shared VM).

Writes ``bench.md`` and ``bench.json`` (one record per CPU setting under ``isa``).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bot import settings
from bot.engine import SamplingParams, Scheduler
from bot.engine.llamacpp import LlamaCppGenerator, import_llama_cpp
from bot.engine.plain import plain_model
from bot.engine.precision import KINDS
from bot.engine.tuning import choose, cpu_features
from bot.eval.bench_report import render, summary
from bot.manifests.data import load_dialogue, split
from bot.manifests.registry import load_all
from bot.manifests.spec import AdapterSpec
from bot.model.backbone import Backbone, resolve_backbone
from bot.model.families import DEFAULT_TARGET_MODULES
from bot.model.info import machine, rss_mb
from bot.tasks.generate import GenerateTask
from bot.util.fsutil import atomic_write_text

log = logging.getLogger(__name__)

PROMPT = "Tell me something interesting about the ocean."
ANALYSIS_TEXT = "The new phone's battery died after one day, what a disappointment."
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
TARGETS = {"fast_vs_fp32": (">=", 2.0), "fast_vs_llamacpp": (">=", 0.5),
           "mixed_vs_sequential": ("<=", 0.6), "fast_ppl_ratio": ("<=", 1.02)}


def _hf_generate(model):
    def gen(ids, n):
        with torch.inference_mode():
            res = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        return res[0, ids.shape[1]:]
    return gen


def _ensure_adapters(bb, adapters_dir) -> list[str]:
    """Trained adapters when present; otherwise random LoRA adapters of the same shape."""
    from peft import LoraConfig  # lazy: peft is heavy

    tasks, _ = load_all(bb, adapters_dir)
    names = [n for n in tasks if n in bb.adapters]  # a `base` route (assistant) has no LoRA
    for i, name in enumerate(["topic", "sentiment", "chat"]):
        if name not in names:
            torch.manual_seed(i)
            bb.add_adapter(name, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                            target_modules=list(DEFAULT_TARGET_MODULES)))
            names.append(name)
    return names


def measure_load(backbone_name, device=None, load_in=None) -> dict:
    with tempfile.TemporaryDirectory() as cold_cache:
        with settings.override("BOT_CACHE", cold_cache):
            t0 = time.perf_counter()
            Backbone.load(backbone_name, device=device, load_in=load_in)
            cold = time.perf_counter() - t0
    resolve_backbone(backbone_name)  # make sure the real cache exists (converts once if not)
    t0 = time.perf_counter()
    bb = Backbone.load(backbone_name, device=device, load_in=load_in)
    return {"cold": cold, "cached": time.perf_counter() - t0, "backbone": bb}


def prompt_ids(bb) -> torch.Tensor:
    return bb.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"].to(bb.device)


def _row(path: str, label: str, rate: float, agree: float | None = None, engine: str = "torch") -> dict:
    return {"path": path, "label": label, "tokens_per_s": round(rate, 2), "agree": agree, "engine": engine}


def measure_generation(bb, adapter: str, n: int, kinds=None, llama=None, repeats: int = 3) -> list[dict]:
    """One row per path: tokens/s of an ``n``-token greedy reply and agreement with fp32 tokens.

    The paths take turns (one reply each, ``repeats`` rounds after a warm-up round), so
    other jobs on a shared machine slow every path alike; each row keeps its median.

    Args:
        kinds: engine kernels to time, each as "small,large" or one kind (default: fp32, w8).
        llama: a LlamaCppGenerator, or None to leave llama.cpp out.
    """
    ids = prompt_ids(bb)
    plain = ids[0].tolist()
    base = _hf_generate(plain_model(bb))

    def engine_path(kind):
        """The engine as every caller runs it (bot.engine.Scheduler), one stream, EOS off."""
        sched = Scheduler(bb, generators=[adapter], precision=kind, max_batch=1)
        sched.eos = set()
        return lambda _ids, k: sched.generate_ids(plain, adapter, SamplingParams(max_tokens=k))

    def naive(_ids, k):
        with bb.lock:
            bb.peft.set_adapter(adapter)
            return _hf_generate(bb.peft)(_ids, k)

    paths = [("base_fp32", "base model, plain transformers fp32 (baseline)", base, "torch"),
             ("peft_fp32", f"'{adapter}' adapter, naive peft unmerged fp32", naive, "torch")]
    paths += [(f"fast_{kind}", f"'{adapter}' adapter, engine {kind} (bot.engine, one stream)",
               engine_path(kind), "torch") for kind in kinds or ("fp32", "w8")]
    if llama is not None:
        # the bar: llama.cpp's own decode loop (``Llama.generate``), EOS suppressed like a
        # logit bias. ``create_completion`` (llama_plain) was also timed and ran about 6x
        # slower than ``generate`` in the same run, so it would make a weak bar.
        paths += [("llamacpp", "base model, llama.cpp (llama-cpp-python generate, same GGUF)",
                   lambda _ids, k: llama_fresh(llama, plain, None, k), "llama.cpp"),
                  ("llamacpp_completion", "base model, llama.cpp create_completion + logit_bias",
                   lambda _ids, k: llama_plain(llama, plain, k), "llama.cpp"),
                  ("llamacpp_lora", f"'{adapter}' adapter, bot's llama.cpp engine (GGUF LoRA)",
                   lambda _ids, k: llama_fresh(llama, plain, adapter, k), "llama.cpp")]
    times = {p[0]: [] for p in paths}
    tokens = {}
    for round_ in range(repeats + 1):
        for path, _, gen, _ in paths:
            t0 = time.perf_counter()
            got = [int(t) for t in gen(ids, n)]
            if round_:  # round 0 warms every path up
                times[path].append(time.perf_counter() - t0)
            if len(got) != n:
                raise RuntimeError(f"{path}: a timed reply had {len(got)} tokens, not {n}")
            tokens[path] = got
    rows = []
    for path, label, _, eng in paths:
        ref = tokens["base_fp32"] if path in ("llamacpp", "llamacpp_completion") else tokens["peft_fp32"]
        agree = None if path in ("base_fp32", "peft_fp32") else _agree(tokens[path], ref)
        rows.append(_row(path, label, n / statistics.median(times[path]), agree, engine=eng))
    return rows


def llama_fresh(gen, prompt: list[int], adapter: str | None, n: int) -> list[int]:
    """llama.cpp's own decode loop from an empty context, exactly ``n`` tokens.

    ``Llama.generate`` keeps the previous call's tokens and skips the prompt prefix they
    share, so a repeated timed run would skip its prefill while the PyTorch rows pay
    theirs; resetting first makes every row pay for the same prompt.
    """
    gen.engine(adapter).reset()
    return gen.generate(prompt, adapter, n, suppress_eos=True)


def llama_plain(gen, prompt: list[int], n: int) -> list[int]:
    """llama.cpp as a user runs it: ``create_completion`` with EOS suppressed by ``logit_bias``."""
    llm = gen.engine(None)
    llm.reset()  # no prompt reuse between timed runs: every path pays its prefill
    res = llm.create_completion(prompt=prompt, max_tokens=n, temperature=0.0,
                                logit_bias={llm.token_eos(): -1e9})
    if res["usage"]["completion_tokens"] != n:
        raise RuntimeError(f"llama.cpp produced {res['usage']['completion_tokens']} tokens, not {n}")
    # the reply's ids (re-tokenized from its text) only serve the agreement column
    toks = llm.tokenize(res["choices"][0]["text"].encode(), add_bos=False, special=True)[:n]
    return toks + [-1] * (n - len(toks))


def _agree(a, b) -> float:
    """Share of positions up to the first differing greedy token (1.0 = identical)."""
    a, b = list(a), list(b)
    same = [int(x == y) for x, y in zip(a, b)]
    return round((same.index(0) if 0 in same else len(same)) / max(1, len(b)), 3)


def measure_quality(bb, adapter: str, n_rows: int = 60, kinds=None, llama=None) -> list[tuple]:
    """Held-out reply perplexity of the chat adapter: fp32 peft vs each fast engine."""
    test = split(load_dialogue(), seed=0).test
    rows = test[:: max(1, len(test) // n_rows)][:n_rows]  # spread over both corpora
    task = GenerateTask(AdapterSpec(name=adapter, kind="generate", template=""), bb)
    out = []
    old = bb.compute_dtype
    bb.compute_dtype = torch.float32
    try:
        out.append(("fp32 peft unmerged", task.perplexity(rows, batch_size=1)))
        for kind in kinds or ("w8",):
            out.append((f"fast path {kind}",
                        task.perplexity(rows, batch_size=1, logits=_engine_runner(bb, adapter, kind))))
        if llama is not None:
            out.append(("llama.cpp engine (Q4_1 GGUF + GGUF LoRA)",
                        task.perplexity(rows, batch_size=1, logits=llama.logits(adapter))))
    finally:
        bb.compute_dtype = old
    return out


def _engine_runner(bb, adapter, kind):
    """Score with the engine's own step and kernel (each row as one prefill)."""
    runner = Scheduler(bb, generators=[adapter], precision=kind, max_batch=1).runner
    return lambda enc: runner.sequence_logits(enc, [adapter] * len(enc["input_ids"]), kind=kind)


def measure_mixed(bb, names: list[str], repeats: int = 10) -> tuple[float, float]:
    texts = [ANALYSIS_TEXT] * len(names)
    runs = {"mixed": lambda: bb.pooled(texts, names),
            "seq": lambda: [bb.pooled([t], [n]) for t, n in zip(texts, names)]}
    times = {k: [] for k in runs}
    for round_ in range(repeats + 1):  # taking turns: other jobs slow both alike
        for key, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if round_:
                times[key].append(time.perf_counter() - t0)
    return statistics.median(times["mixed"]), statistics.median(times["seq"])


def _llama_features(gen) -> str:
    """llama.cpp's own SIMD flags (it does not read ATen's or oneDNN's variables)."""
    info = gen.llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    return " ".join(part.strip() for part in info.split("|") if "= 1" in part or "=1" in part)


def bench_one_isa(*, adapters_dir, backbone=None, device=None, load_in=None, tokens: int = 64, with_load: bool = True,
                  quality_rows: int = 60, all_kinds: bool = False, refresh_kernels: bool = False) -> dict:
    """Everything for the CPU setting this process runs under (see the module docstring).

    Args:
        all_kinds: time and score every kernel end to end, not only the chosen one, fp32
            merged and w8 (every kernel's decode step is in the kernel measurement anyway).
        refresh_kernels: measure the kernel choice again instead of using the cached one.
    """
    features = {**cpu_features(), "threads": torch.get_num_threads()}
    if with_load:
        log.info("measuring load times (cold load converts the GGUF into a temporary cache) ...")
        load = measure_load(backbone, device=device, load_in=load_in)
        bb = load.pop("backbone")
    else:
        bb, load = Backbone.load(backbone, device=device, load_in=load_in), None
    rss0 = rss_mb()
    names = _ensure_adapters(bb, adapters_dir)
    adapter = "chat" if "chat" in names else names[0]
    log.info("measuring the kernel choice (%s) ...", features["aten_capability"])
    choice = choose(bb, refresh=refresh_kernels)
    llama, llama_note = None, "llama-cpp-python is not importable (pip install -e '.[llamacpp]')"
    if import_llama_cpp() is not None:
        try:
            llama = LlamaCppGenerator(bb)
            llama_note = _llama_features(llama)
        except Exception as err:  # reported in the record, never fatal
            llama_note = f"llama.cpp engine unavailable: {err}"
    kinds = KINDS if all_kinds else tuple(dict.fromkeys(("fp32", "w8", choice.kind)))
    log.info("measuring generation ...")
    gen = measure_generation(bb, adapter, tokens, kinds=kinds, llama=llama)
    log.info("measuring quality ...")
    scored = dict.fromkeys(k for k in ("w8", choice.small, choice.large) if k != "fp32")
    quality = measure_quality(bb, adapter, n_rows=quality_rows, llama=llama,
                              kinds=KINDS if all_kinds else tuple(scored))
    log.info("measuring mixed batch ...")
    mixed_names = names[:3]
    mixed, seq = measure_mixed(bb, mixed_names)
    rates = {r["path"]: r["tokens_per_s"] for r in gen}
    ppl = dict(quality)
    ref = quality[0][1]
    fast = rates[f"fast_{choice.kind}"]
    rec = {
        "features": features, "llamacpp_features": llama_note, "adapter": adapter, "tokens": tokens,
        "kernel": {"kind": choice.kind, "small": choice.small, "large": choice.large,
                   "threshold": choice.threshold, "reason": choice.reason, "measured": choice.measured,
                   "cached": choice.cached, "key": choice.key},
        "generation": [{**r, "vs_fp32": round(r["tokens_per_s"] / rates["base_fp32"], 3)} for r in gen],
        "quality": [{"path": k, "perplexity": round(v, 3), "vs_fp32": round(v / ref, 4)} for k, v in quality],
        "mixed": {"adapters": mixed_names, "mixed_ms": round(mixed * 1000, 1), "sequential_ms": round(seq * 1000, 1)},
        "fast_vs_fp32": round(fast / rates["base_fp32"], 3),
        "fast_vs_llamacpp": round(fast / rates["llamacpp"], 3) if "llamacpp" in rates else None,
        "llamacpp_engine_vs_fp32": (round(rates["llamacpp_lora"] / rates["base_fp32"], 3)
                                    if "llamacpp_lora" in rates else None),
        "llamacpp_engine_vs_llamacpp": (round(rates["llamacpp_lora"] / rates["llamacpp"], 3)
                                        if "llamacpp" in rates else None),
        "llamacpp_vs_fp32": round(rates["llamacpp"] / rates["base_fp32"], 3) if "llamacpp" in rates else None,
        "mixed_vs_sequential": round(mixed / seq, 3),
        "fast_ppl_ratio": round(max([ppl[f"fast path {k}"] for k in scored] or [ref]) / ref, 4),
        "load": load, "names": names, "quality_rows": quality_rows,
        "memory": {"backbone_mb": sum(p.numel() * p.element_size() for n_, p in bb.base.named_parameters()
                                      if "lora_" not in n_) / 1e6,
                   "adapters_mb": {n: bb.adapter_nbytes(n) / 1e6 for n in names}, "rss_mb": rss0},
        "backbone": {"name": bb.info.name, "parameters_m": round(bb.num_parameters / 1e6, 1),
                     "fingerprint": bb.fingerprint},
    }
    return rec


def training_cache_rows(adapters_dir: str | Path) -> list[dict]:
    """Each classify adapter's frozen-layer cache timing (``bot train NAME --time-cache N``).

    Read from the adapters' metrics.json, where the side-by-side timing was recorded; an
    adapter that was never timed is listed with ``cache_speedup`` None.
    """
    rows = []
    for path in sorted(Path(adapters_dir).glob("*/metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(metrics, dict) or metrics.get("kind") != "classify":
            continue
        timing = metrics.get("cache_timing") or {}
        rows.append({"adapter": path.parent.name, "cache_speedup": metrics.get("cache_speedup"),
                     **{k: timing.get(k) for k in ("cache_speedup_cpu", "uncached_epoch_seconds",
                                                    "cached_epoch_seconds", "cache_build_seconds",
                                                    "cache_mb", "first_cached_layer", "steps_timed",
                                                    "threads", "date")},
                     "train_seconds": metrics.get("train_seconds"), "epochs": metrics.get("epochs")})
    return rows


def run_bench(*, adapters_dir: str | Path, backbone: str | None = None, out: str | Path = "reports/bench.md",
              tokens: int = 64, command_line: str = "", llamacpp_path: str | None = None,
              llamacpp_avx2_path: str | None = None, isas=("native", "avx2"), all_kinds: bool = False,
              refresh_kernels: bool = False, threads: int | None = None, quality_rows: int = 60,
              device: str | None = None, load_in: str | None = None) -> str:
    """Run :func:`bench_one_isa` per CPU setting in child processes; write ``out`` and its .json.

    Args:
        adapters_dir: folder with trained adapters (missing defaults get random LoRA weights).
        backbone: backbone name, folder, .gguf file or hub id (None: the embedded default).
        out: markdown file to write (``bench.json`` goes beside it).
        tokens: exact length of the greedy reply that is timed.
        command_line: recorded in the report.
        llamacpp_path: a site-packages folder holding llama_cpp (``BOT_LLAMACPP_PATH``).
        llamacpp_avx2_path: the same for the AVX2 run (a llama.cpp built for AVX2 only);
            default ``llamacpp_path``.
        isas: which CPU settings to run ("native", "avx2").
        all_kinds: time every kernel end to end (see :func:`bench_one_isa`).
        refresh_kernels: measure the kernel choice again rather than reuse the cached one.
        quality_rows: held-out dialogue pairs scored for the perplexity check.
        device: auto|cpu|cuda|mps (None: $BOT_DEVICE or auto).
        load_in: weight precision auto|fp32|bf16|8bit|4bit (None: $BOT_LOAD_IN or auto).
        threads: torch and llama.cpp threads in the children (default: torch's default).
            On a machine shared with other jobs, 1 avoids threads waiting at every op for a
            descheduled peer, which made a decode step take seconds here.

    Returns:
        the markdown that was written.
    """
    paths = {"native": llamacpp_path, "avx2": llamacpp_avx2_path or llamacpp_path}
    records = []
    for i, name in enumerate(isas):
        env = {**os.environ, **(AVX2_ENV if name == "avx2" else {})}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        if paths[name]:
            env["BOT_LLAMACPP_PATH"] = str(paths[name])
        log.info("benchmark, CPU setting %s ...", name)
        with tempfile.NamedTemporaryFile(suffix=".json") as fh:
            args = {"adapters_dir": str(adapters_dir), "backbone": backbone, "tokens": tokens,
                    "device": device, "load_in": load_in,
                    "with_load": i == 0, "all_kinds": all_kinds,
                    "refresh_kernels": refresh_kernels, "quality_rows": quality_rows, "json": fh.name}
            subprocess.run([sys.executable, "-m", "bot.eval.bench", json.dumps(args)], env=env, check=True)
            rec = json.loads(Path(fh.name).read_text())
        rec["isa"] = name
        records.append(rec)
    result = {"command": command_line, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()}, **summary(records, TARGETS),
              "isa": records, "training_cache": training_cache_rows(adapters_dir)}
    out = Path(out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    text = render(result=result)
    atomic_write_text(out, text)
    return text


def main(argv=None) -> int:
    """Child entry: ``python -m bot.eval.bench '{"adapters_dir": ..., "json": ...}'``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = json.loads((argv or sys.argv[1:])[0])
    out = Path(args.pop("json"))
    out.write_text(json.dumps(bench_one_isa(**args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
