"""`bot bench`'s measuring and rendering on the tiny backbone (figures are not asserted, shapes are)."""

from __future__ import annotations

import json

import pytest
from helpers import make_tiny_backbone
from peft import LoraConfig

from bot.eval import bench, bench_report
from bot.model.families import DEFAULT_TARGET_MODULES


@pytest.fixture
def bb():
    import torch

    backbone = make_tiny_backbone()
    torch.manual_seed(0)
    backbone.add_adapter("chat", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=list(DEFAULT_TARGET_MODULES)))
    return backbone


def test_quality_rows_score_the_same_replies_on_every_path(bb):
    rows = bench.measure_quality(bb, "chat", n_rows=6, kinds=("bf16", "w8", "w8f"))
    assert [label for label, _ in rows] == ["fp32 peft unmerged", "fast path bf16", "fast path w8",
                                            "fast path w8f"]
    fp32 = rows[0][1]
    assert fp32 > 1
    for _, ppl in rows[1:]:  # the merged engines compute the same model in lower precision
        assert ppl == pytest.approx(fp32, rel=0.05)


def test_generation_rows_time_exactly_n_tokens_on_each_kernel(bb):
    rows = bench.measure_generation(bb, "chat", 4, kinds=("fp32", "w8"))
    assert [r["path"] for r in rows] == ["base_fp32", "peft_fp32", "fast_fp32", "fast_w8"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    # the engine in fp32 computes what unmerged peft computes: same greedy tokens
    assert rows[2]["agree"] == 1.0
    assert "bot.engine" in rows[2]["label"]


def _record(isa, fast=50.0, llama=100.0, mixed=(50.0, 100.0)):
    gen = [{"path": "base_fp32", "label": "base", "tokens_per_s": 10.0, "agree": None, "engine": "torch",
            "vs_fp32": 1.0},
           {"path": "fast_w8", "label": "'chat' adapter, fast path w8 (merged)", "tokens_per_s": fast,
            "agree": 0.5, "engine": "torch", "vs_fp32": fast / 10}]
    return {"isa": isa, "features": {"aten_capability": "AVX2", "native_bf16": False, "torch": "2.13.0",
                                     "threads": 2, "isa_env": {"ATEN_CPU_CAPABILITY": "avx2"}},
            "llamacpp_features": "AVX2 = 1", "adapter": "chat", "tokens": 4,
            "kernel": {"kind": "w8", "reason": "w8: faster", "measured": {}}, "generation": gen,
            "quality": [{"path": "fp32 peft unmerged", "perplexity": 20.0, "vs_fp32": 1.0},
                        {"path": "fast path w8", "perplexity": 20.2, "vs_fp32": 1.01}],
            "mixed": {"adapters": ["chat"], "mixed_ms": mixed[0], "sequential_ms": mixed[1]},
            "fast_vs_fp32": fast / 10, "fast_vs_llamacpp": None if llama is None else fast / llama,
            "llamacpp_engine_vs_fp32": None if llama is None else 8.0,
            "llamacpp_engine_vs_llamacpp": None if llama is None else 0.8,
            "mixed_vs_sequential": mixed[0] / mixed[1], "fast_ppl_ratio": 1.01,
            "load": {"cold": 2.0, "cached": 0.5}, "names": ["chat"],
            "memory": {"backbone_mb": 1.0, "adapters_mb": {"chat": 0.01}, "rss_mb": 100.0},
            "backbone": {"name": "tiny", "parameters_m": 0.1, "fingerprint": "tiny@0"}}


def test_summary_says_not_met_per_target_over_every_cpu_setting():
    records = [_record("native"), _record("avx2", fast=15.0, mixed=(70.0, 100.0))]
    s = bench_report.summary(records, bench.TARGETS)["summary"]
    assert s["fast_vs_fp32"]["values"] == {"native": 5.0, "avx2": 1.5}
    assert s["fast_vs_fp32"]["met"] is False and s["fast_vs_llamacpp"]["met"] is False
    assert s["mixed_vs_sequential"]["met"] is False and s["fast_ppl_ratio"]["met"] is True
    absent = bench_report.summary([_record("native", llama=None)], bench.TARGETS)["summary"]
    assert absent["fast_vs_llamacpp"]["met"] is None


def test_render_writes_every_section_and_the_verdicts():
    records = [_record("native"), _record("avx2", fast=15.0)]
    result = {"command": "bot bench --tokens 4", "machine": "x86_64, 2 CPU cores", "date": "today",
              "isa": records, **bench_report.summary(records, bench.TARGETS)}
    text = bench_report.render(result=result)
    assert "Command: `bot bench --tokens 4`" in text
    for section in ("## Targets", "## Load", "## CPU setting: native", "## CPU setting: avx2",
                    "### Generation (4-token", "### Mixed batch", "## Memory"):
        assert section in text
    assert "| fast_vs_fp32 | 5.0 | 1.5 | >= 2.0 | **NOT MET** |" in text
    assert "fast path w8 (merged) ← chosen" in text
    assert "| cached safetensors load | 0.50 | 0.250 |" in text
    assert "ATen kernels AVX2, native bf16 False" in text and "llama.cpp rows: AVX2 = 1" in text


def test_training_cache_section_reads_each_classify_adapters_timing(tmp_path):
    timing = {"cache_speedup_cpu": 2.31, "uncached_epoch_seconds": 430.0, "cached_epoch_seconds": 190.0,
              "cache_build_seconds": 150.0, "cache_mb": 895.0, "first_cached_layer": 24, "steps_timed": 8,
              "threads": 2, "date": "2026-11-29 08:00:00"}
    for name, metrics in {"topic": {"kind": "classify", "cache_speedup": 2.26, "cache_timing": timing},
                          "sentiment": {"kind": "classify"},          # trained, never timed
                          "chat": {"kind": "generate"}}.items():      # not a classifier: left out
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    rows = bench.training_cache_rows(tmp_path)
    assert [r["adapter"] for r in rows] == ["sentiment", "topic"]
    assert rows[0]["cache_speedup"] is None and rows[1]["cache_speedup"] == 2.26
    text = "\n".join(bench_report._training_cache(rows))
    assert "## Training: frozen-layer cache" in text
    assert "| topic | 24 | 430 | 190 | **2.26x** | 2.31x | 150 | 895 | 8 | 2026-11-29 08:00:00 |" in text
    assert "bot train sentiment --time-cache 8" in text
