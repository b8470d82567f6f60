"""`bot bench`'s markdown and target summary from the per-CPU-setting records (bot.eval.bench)."""

from __future__ import annotations


def _met(value, op: str, target: float):
    if value is None:
        return None
    return value >= target if op == ">=" else value <= target


def summary(records: list[dict], targets: dict) -> dict:
    """Per target: the value on each CPU setting and whether it is met on all of them."""
    out = {}
    for key, (op, target) in targets.items():
        values = {r["isa"] if "isa" in r else str(i): r.get(key) for i, r in enumerate(records)}
        flags = [_met(v, op, target) for v in values.values()]
        met = None if any(f is None for f in flags) else all(flags)
        out[key] = {"values": values, "target": f"{op} {target}", "met": met}
    return {"summary": out}


def _features(rec: dict) -> str:
    f = rec["features"]
    env = f" (env {', '.join(f'{k}={v}' for k, v in f['isa_env'].items())})" if f.get("isa_env") else ""
    return (f"PyTorch rows: ATen kernels {f['aten_capability']}, native bf16 {f['native_bf16']}, "
            f"torch {f['torch']}, {f['threads']} threads{env}. llama.cpp rows: {rec['llamacpp_features']}.")


def _verdict(entry: dict) -> str:
    if entry["met"] is None:
        return "not measured"
    return "met" if entry["met"] else "**NOT MET**"


def render(*, result: dict) -> str:
    """The benchmark markdown (see ``bot.eval.bench.run_bench``)."""
    first = result["isa"][0]
    b = first["backbone"]
    lines = ["# Benchmark", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}, {result['date']}  ",
             f"Backbone: {b['name']} ({b['parameters_m']} M parameters), fingerprint `{b['fingerprint']}`", "",
             "Each CPU setting runs in a fresh process: `native` = the machine as it is; `avx2` = "
             "`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` (PyTorch limited to AVX2, as on most "
             "laptops; close to, not the same as, a real AVX2-only CPU). Ratios compare rows of the "
             "same process.", "", "## Targets", "",
             "| figure | " + " | ".join(r["isa"] for r in result["isa"]) + " | target | verdict |",
             "|---|" + "---|" * len(result["isa"]) + "---|---|"]
    for key, entry in result["summary"].items():
        vals = " | ".join("n/a" if v is None else f"{v}" for v in entry["values"].values())
        lines.append(f"| {key} | {vals} | {entry['target']} | {_verdict(entry)} |")
    lines += ["", "`fast_vs_*` use the engine (bot.engine, one stream) with the kernels `bot.engine.tuning` chose; "
              "`llamacpp_engine_*` below is the optional llama.cpp engine (`.[llamacpp]` extra).", ""]
    load = first.get("load")
    if load:
        lines += ["## Load", "", "| what | seconds | ratio |", "|---|---|---|",
                  f"| cold: GGUF de-quantize + convert + load (baseline) | {load['cold']:.1f} | 1.00 |",
                  f"| cached safetensors load | {load['cached']:.2f} | {load['cached'] / load['cold']:.3f} |", ""]
    for rec in result["isa"]:
        lines += _isa_section(rec)
    lines += _memory(first)
    lines += _training_cache(result.get("training_cache") or [])
    return "\n".join(lines)


def _training_cache(rows: list[dict]) -> list[str]:
    """Classify training with and without the frozen-layer cache (from metrics.json)."""
    if not rows:
        return []
    lines = ["", "## Training: frozen-layer cache", "",
             "Seconds per training epoch of each classify adapter, whole model vs cached lower layers, "
             "timed side by side in one run (`bot train NAME --time-cache N`, recorded in the "
             "adapter's metrics.json; target: cached <= 0.5x uncached, i.e. cache_speedup >= 2).", "",
             "| adapter | first LoRA layer | uncached s/epoch | cached s/epoch | cache_speedup (wall) "
             "| CPU time | one-off cache pass s | cache MB | step pairs | measured |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("cache_speedup") is None:
            lines.append(f"| {r['adapter']} | not timed: run `bot train {r['adapter']} --time-cache 8` "
                         "| | | | | | | | |")
            continue
        lines.append(f"| {r['adapter']} | {r['first_cached_layer']} | {r['uncached_epoch_seconds']:.0f} "
                     f"| {r['cached_epoch_seconds']:.0f} | **{r['cache_speedup']:.2f}x** "
                     f"| {r['cache_speedup_cpu']:.2f}x | {r['cache_build_seconds']:.0f} | {r['cache_mb']:.0f} "
                     f"| {r['steps_timed']} | {r['date']} |")
    return lines


def _isa_section(rec: dict) -> list[str]:
    k = rec["kernel"]
    lines = [f"## CPU setting: {rec['isa']}", "", _features(rec), "",
             f"Kernels chosen by `bot.engine.tuning` ({'cached from its first-use measurement' if k.get('cached') else 'measured in this run'}"
             f", key `{k.get('key', '')}`): **{k['kind']}**: {k['reason']}.", "",
             f"### Generation ({rec['tokens']}-token greedy reply, exactly {rec['tokens']} new tokens "
             "(EOS suppressed), batch 1, median of 3 taking turns, same prompt ids on every row)", "",
             "| path | engine | tokens/s | × base fp32 | greedy tokens identical to fp32 (prefix) |",
             "|---|---|---|---|---|"]
    for r in rec["generation"]:
        chosen = " ← chosen" if r["path"] == f"fast_{k['kind']}" else ""
        agree = "" if r["agree"] is None else f"{r['agree']:.0%}"
        lines.append(f"| {r['label']}{chosen} | {r['engine']} | {r['tokens_per_s']:.1f} | {r['vs_fp32']:.2f} | {agree} |")
    if rec["fast_vs_llamacpp"] is not None:
        lines += ["", f"Fast path ({k['kind']}) = {rec['fast_vs_llamacpp']:.2f}x llama.cpp; "
                  f"bot's llama.cpp engine with the adapter = {rec['llamacpp_engine_vs_llamacpp']:.2f}x "
                  f"llama.cpp and {rec['llamacpp_engine_vs_fp32']:.2f}x base fp32."]
    lines += ["", f"Held-out reply perplexity of '{rec['adapter']}' ({rec.get('quality_rows', 60)} dialogue test pairs):", "",
              "| path | perplexity | × fp32 |", "|---|---|---|"]
    for q in rec["quality"]:
        lines.append(f"| {q['path']} | {q['perplexity']:.2f} | {q['vs_fp32']:.3f} |")
    m = rec["mixed"]
    lines += ["", f"### Mixed batch ({len(m['adapters'])} adapters: {', '.join(m['adapters'])}; one short message)", "",
              "| path | ms (median of 10, taking turns) | ratio |", "|---|---|---|",
              f"| {len(m['adapters'])} sequential calls (baseline) | {m['sequential_ms']:.0f} | 1.00 |",
              f"| one mixed-adapter batch | {m['mixed_ms']:.0f} | {rec['mixed_vs_sequential']:.2f} |", ""]
    return lines


def _memory(rec: dict) -> list[str]:
    mem = rec["memory"]
    lines = ["## Memory", "", "| what | MB | share of backbone weights |", "|---|---|---|",
             f"| backbone weights (fp32) | {mem['backbone_mb']:.0f} | 1.000 |"]
    for name, mb in mem["adapters_mb"].items():
        lines.append(f"| adapter '{name}' LoRA tensors | {mb:.2f} | {mb / mem['backbone_mb']:.4f} |")
    lines += [f"| process resident memory after loading backbone | {mem['rss_mb']:.0f} | |", "",
              "Fast path = adapter merged into a private copy of the weights (built once, cached), then "
              "converted to the chosen kernels; see bot/engine/.", ""]
    return lines
