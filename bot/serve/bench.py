"""``bot bench --serve``: throughput, time to first token and memory of ``bot serve``.

For each CPU setting (as the machine is, and with AVX2 only) a fresh process starts
``bot serve`` on a free port and drives it with the ``openai`` client: the same
requests (held-out dialogue prompts, spread over the generation adapters and the
base model) sent one by one, then by 4, 8 and 16 concurrent clients. The figures
are ratios against the one-by-one run measured in the same process, minutes apart.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
LEVELS = (1, 4, 8, 16)
TARGETS = {"speedup_8": 4.0, "p95_ttft_ms_8": 1500.0, "failed": 0, "adapter_memory_share": 0.02}


def cpu_features() -> dict:
    """What this process's torch will use: ATen's kernel level and native bf16 support."""
    import torch

    from ..info import cpu_name

    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        bf16 = False
    return {"cpu": cpu_name(), "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": bf16, "threads": torch.get_num_threads(),
            "env": {k: os.environ[k] for k in AVX2_ENV if k in os.environ}}


def bench_prompts(adapters_dir, n: int) -> list[str]:
    """Held-out dialogue prompts (the chat adapter's test split): what users type."""
    from ..routing.build import spec_splits
    from ..spec import AdapterSpec

    spec = AdapterSpec.from_dir(Path(adapters_dir) / "chat")
    rows = spec_splits(spec).test
    prompts = [r["prompt"] for r in rows if 10 <= len(r["prompt"]) <= 200]
    return prompts[:n]


# ------------------------------------------------------------------ memory
def measure_memory(backbone, adapters_dir, extra: int = 3) -> dict:
    """Resident memory with 1 and with 1 + ``extra`` generation adapters being served."""
    from ..backbone import Backbone
    from ..info import rss_mb
    from .scheduler import Scheduler

    bb = Backbone.load(backbone)
    folder = Path(adapters_dir) / "chat"
    bb.load_adapter("chat", folder)
    sched = Scheduler(bb, generators=["chat"], precision="auto")
    gc.collect()
    one = rss_mb()
    for i in range(extra):  # the same weights under other names: the same size as new adapters
        bb.load_adapter(f"chat{i + 2}", folder)
        sched.engine.add_adapter(f"chat{i + 2}")
    gc.collect()
    more = rss_mb()
    backbone_mb = sum(p.numel() * p.element_size() for p in bb.base.parameters()) / 2**20
    per = (more - one) / extra
    lora_mb = bb.adapter_nbytes("chat") / 2**20
    # RSS growth can hide an adapter in pages the allocator already held; the LoRA tensors
    # are a floor, so the share reported is the larger of the two
    share = max(per, lora_mb) / backbone_mb
    return {"rss_mb_1_adapter": round(one, 1), f"rss_mb_{1 + extra}_adapters": round(more, 1),
            "per_adapter_mb": round(per, 2), "lora_mb": round(lora_mb, 2),
            "backbone_mb": round(backbone_mb, 1), "adapter_memory_share": round(share, 4),
            "precision": sched.precision}


def measure_quality(bb, task, n_rows: int = 60) -> dict:
    """Held-out reply perplexity through the serving engine: this CPU's precision vs fp32."""
    from ..routing.build import spec_splits
    from .lora import LoraEngine
    from .scheduler import auto_precision

    rows = spec_splits(task.spec).test[:n_rows]
    out = {"n": len(rows)}
    auto = auto_precision(bb)  # the kernel bot serve picks for this CPU (bot.kernels)
    for precision in dict.fromkeys(["fp32", auto]):
        engine = LoraEngine(bb, precision)
        engine.add_adapter(task.name)
        out[f"ppl_{precision}"] = round(task.perplexity(
            rows, batch_size=8,
            logits=lambda enc, e=engine: e.sequence_logits(enc, [task.name] * len(enc["input_ids"]))), 3)
        del engine
    out["precision"] = auto
    out["ppl_ratio"] = round(out[f"ppl_{auto}"] / out["ppl_fp32"], 4)
    return out


# ------------------------------------------------------------------- load
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(adapters_dir, backbone, port: int, log_path: Path, max_batch: int = 16):
    cmd = [sys.executable, "-m", "bot.cli", "serve", "--port", str(port), "--no-router",
           "--adapters-dir", str(adapters_dir), "--max-batch", str(max_batch), "--max-queue", "256"]
    if backbone:
        cmd += ["--backbone", backbone]
    fh = open(log_path, "w")  # noqa: SIM115 (kept open for the server's lifetime)
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    import httpx

    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"bot serve exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"bot serve did not start: {log_path.read_text()[-2000:]}")


def run_level(base_url: str, jobs: list[tuple[str, str]], clients: int, max_tokens: int) -> dict:
    """Send every job with ``clients`` concurrent streaming clients; time it all."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    todo = list(enumerate(jobs))
    lock = threading.Lock()
    ttft, tokens, failed, texts = [], [], [], {}

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i, (model, prompt) = todo.pop(0)
            t0 = time.perf_counter()
            first, pieces, usage = None, [], None
            try:
                stream = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], temperature=0,
                    max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter()
                        pieces.append(chunk.choices[0].delta.content)
                    usage = getattr(chunk, "usage", None) or usage
            except Exception as err:  # counted, never fatal: the benchmark reports failures
                failed.append(f"{model}: {err}")
                continue
            with lock:
                ttft.append(((first or time.perf_counter()) - t0) * 1000)
                tokens.append(usage.completion_tokens if usage else len(pieces))
                texts[i] = "".join(pieces)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(ttft, n=20) if len(ttft) >= 2 else ttft * 19
    return {"clients": clients, "requests": len(jobs), "failed": len(failed),
            "errors": failed[:3], "tokens": sum(tokens), "seconds": round(wall, 2),
            "tokens_per_s": round(sum(tokens) / wall, 2),
            "p50_ttft_ms": round(statistics.median(ttft), 1) if ttft else None,
            "p95_ttft_ms": round(q[18], 1) if ttft else None, "texts": texts}


def bench_one_isa(adapters_dir, backbone=None, n_requests: int = 32, max_tokens: int = 48) -> dict:
    """Everything for the CPU setting this process runs under."""
    from ..backbone import Backbone
    from ..registry import load_all

    features = cpu_features()
    memory = measure_memory(backbone, adapters_dir)
    gc.collect()
    bb = Backbone.load(backbone)
    tasks, _ = load_all(bb, adapters_dir)
    generators = [n for n, t in tasks.items() if t.kind == "generate"]
    models = [bb.info.name, *generators]
    quality = measure_quality(bb, tasks["chat"]) if "chat" in tasks else None
    del bb, tasks
    gc.collect()
    prompts = bench_prompts(adapters_dir, n_requests)
    jobs = [(models[i % len(models)], p) for i, p in enumerate(prompts)]
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(adapters_dir, backbone, port, Path(tmp) / "serve.log")
        try:
            url = f"http://127.0.0.1:{port}/v1"
            import httpx

            features["precision"] = httpx.get(f"http://127.0.0.1:{port}/health").json()["precision"]
            run_level(url, jobs[:4], 4, 8)  # warm-up
            levels = {c: run_level(url, jobs, c, max_tokens) for c in LEVELS}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    seq = levels[1]
    same = sum(levels[c]["texts"].get(i) == seq["texts"].get(i) for c in LEVELS[1:]
               for i in range(len(jobs)))
    for lv in levels.values():
        lv["speedup"] = round(lv["tokens_per_s"] / seq["tokens_per_s"], 2)
        lv.pop("texts")
    return {"features": features, "models": models, "max_tokens": max_tokens,
            "levels": {str(c): v for c, v in levels.items()}, "memory": memory,
            "quality": quality,
            "identical_to_sequential": f"{same}/{len(jobs) * (len(LEVELS) - 1)}",
            "speedup_8": levels[8]["speedup"], "p95_ttft_ms_8": levels[8]["p95_ttft_ms"],
            "failed": sum(v["failed"] for v in levels.values()),
            "adapter_memory_share": memory["adapter_memory_share"]}


def run_serve_bench(*, adapters_dir, backbone: str | None = None, out_dir="reports",
                    n_requests: int = 32, max_tokens: int = 48, command_line: str = "") -> dict:
    """Run :func:`bench_one_isa` as the machine is and with AVX2 only; write serve.md/json."""
    from ..fsutil import atomic_write_text
    from ..info import machine

    records = []
    for name, env in (("native", {}), ("avx2", AVX2_ENV)):
        log.info("serving benchmark, CPU setting: %s %s", name, env or "")
        with tempfile.NamedTemporaryFile(suffix=".json") as fh:
            args = {"adapters_dir": str(adapters_dir), "backbone": backbone, "json": fh.name,
                    "n_requests": n_requests, "max_tokens": max_tokens}
            cmd = [sys.executable, "-m", "bot.serve.bench", json.dumps(args)]
            subprocess.run(cmd, env={**os.environ, **env}, check=True)
            rec = json.loads(Path(fh.name).read_text())
        rec["isa"] = name
        records.append(rec)
    result = {"command": command_line, "machine": machine(), "targets": TARGETS, "isa": records,
              **{k: records[0][k] for k in TARGETS}}
    out = Path(out_dir)
    atomic_write_text(out / "serve.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "serve.md", render_serve(result))
    return result


def render_serve(result: dict) -> str:
    lines = ["# Serving benchmark (`bot serve`)", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}", "",
             "Each CPU setting runs in a fresh process: `bot serve` on a free port, driven by the "
             "`openai` client with streaming requests (held-out dialogue prompts spread over the "
             "base model and the generation adapters, greedy). Sequential = the same requests "
             "sent one by one in the same run.", ""]
    for rec in result["isa"]:
        f = rec["features"]
        lines += [f"## CPU setting: {rec['isa']}", "",
                  f"ATen kernels {f['aten_capability']}, native bf16 {f['native_bf16']}, "
                  f"engine precision {f['precision']}, {f['threads']} threads"
                  + (f", env {f['env']}" if f["env"] else "") + f"; models {rec['models']}; "
                  f"max_tokens {rec['max_tokens']}.", "",
                  "| concurrent clients | requests | tokens/s | vs sequential | p50 TTFT ms | "
                  "p95 TTFT ms | failed |", "|---|---|---|---|---|---|---|"]
        for c, lv in rec["levels"].items():
            lines.append(f"| {c} | {lv['requests']} | {lv['tokens_per_s']} | {lv['speedup']}x | "
                         f"{lv['p50_ttft_ms']} | {lv['p95_ttft_ms']} | {lv['failed']} |")
        m = rec["memory"]
        keys = [k for k in m if k.startswith("rss_mb_")]
        lines += ["", f"Replies identical to the sequential run: {rec['identical_to_sequential']} "
                  "(exact in fp32; int8/bf16 rows can differ by batch composition).", "",
                  f"Memory ({m['precision']} engine): RSS {m[keys[0]]} MB with 1 generation "
                  f"adapter, {m[keys[1]]} MB with 4; {m['per_adapter_mb']} MB per extra adapter "
                  f"(its LoRA tensors: {m['lora_mb']} MB); the larger of the two is "
                  f"{m['adapter_memory_share']:.2%} of the {m['backbone_mb']} MB backbone.", ""]
        q = rec.get("quality")
        if q:
            reduced = q[f"ppl_{q['precision']}"]
            lines += [f"Held-out chat reply perplexity through the serving engine (n={q['n']}): "
                      f"fp32 {q['ppl_fp32']}, {q['precision']} {reduced} ({q['ppl_ratio']:.4f}x).",
                      ""]
    lines += ["## Targets (first CPU setting)", "", "| figure | measured | target |", "|---|---|---|"]
    for key, target in TARGETS.items():
        lines.append(f"| {key} | {result[key]} | {'<=' if key != 'speedup_8' else '>='} {target} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Child process entry: ``python -m bot.serve.bench '{"adapters_dir": ..., "json": ...}'``."""
    args = json.loads((argv or sys.argv[1:])[0])
    out = Path(args.pop("json"))
    rec = bench_one_isa(**args)
    out.write_text(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
