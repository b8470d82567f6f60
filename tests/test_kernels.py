"""bot.kernels: every kernel computes the same model, the choice is measured once per key and cached."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_backbone, make_tiny_model
from peft import LoraConfig

from bot import kernels
from bot.spec import DEFAULT_TARGET_MODULES


@pytest.fixture
def bb(monkeypatch, tmp_path):
    monkeypatch.setenv("BOT_CACHE", str(tmp_path))
    monkeypatch.delenv("BOT_KERNEL", raising=False)
    # hidden 64 so that the int4 kernel's groups of 32 fit every layer
    backbone = make_tiny_backbone()
    backbone.base = make_tiny_model(hidden=64)
    torch.manual_seed(0)
    backbone.add_adapter("chat", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=list(DEFAULT_TARGET_MODULES)))
    return backbone


def _ids(bb):
    return bb.tokenizer("the lighthouse keeper climbed the stairs", return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("kind", kernels.KINDS)
def test_every_kernel_scores_text_within_two_percent_of_fp32(bb, kind):
    from bot.fastgen import build_engine

    ids = _ids(bb)

    def ppl(model):
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, :-1].float()
        return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp())

    ref = ppl(build_engine(bb, "chat", "fp32"))
    engine = build_engine(bb, "chat", kind)
    assert ppl(engine) == pytest.approx(ref, rel=kernels.MAX_PPL_RATIO - 1)
    quantized = {type(m).__name__ for m in engine.modules()}
    expected = {"w8": "Int8WeightLinear", "w8f": "Int8WeightLinear", "w4": "Int4WeightLinear",
                "w8h": "Int8WeightLinear"}.get(kind)
    assert expected is None or expected in quantized
    if kind in kernels.F16_HEAD:
        assert type(engine.get_output_embeddings()).__name__ == "Float16WeightLinear"
        assert engine.model.layers[0].mlp.down_proj.__class__.__name__ == (
            "Int8WeightLinear" if kind == "w8h" else "Linear")
    if kind == "w8f":
        assert engine.model.embed_tokens.weight.dtype == torch.float32


def test_int4_layer_matches_dequantized_weights():
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    layer = kernels.Int4WeightLinear(w, None)
    x = torch.randn(3, 96)
    # weights already on the int4 grid of each group (Q4_1-like) round-trip up to bf16 scales
    assert (layer(x).float() - x @ w.T).abs().max() < 0.1 * (x @ w.T).abs().max()


def test_choice_is_measured_once_cached_and_reused(bb, monkeypatch, tmp_path):
    calls = []
    real = kernels.measure

    def counting(backbone, kinds=kernels.CANDIDATES, steps=6):
        calls.append(kinds)
        return real(backbone, kinds=kinds, steps=2)

    monkeypatch.setattr(kernels, "measure", counting)
    first = kernels.choose(bb)
    assert not first.cached and len(calls) == 1
    assert first.kind in kernels.KINDS and first.kind in first.reason
    assert set(first.measured) >= {"fp32", "w8"}
    data = json.loads((tmp_path / kernels.CACHE_FILE).read_text())
    assert data[first.key]["kind"] == first.kind
    again = kernels.choose(bb)
    assert again.cached and again.kind == first.kind and len(calls) == 1
    # a choice cached by a bot with other candidates is measured again
    data[first.key]["candidates"] = ["fp32", "w8"]
    (tmp_path / kernels.CACHE_FILE).write_text(json.dumps(data))
    assert not kernels.choose(bb).cached and len(calls) == 2
    latest = kernels.choose(bb)  # timed again on a tiny model: it may pick another kernel
    assert latest.cached and len(calls) == 2
    # the serving engine takes the same (cached) choice
    from bot.serve.scheduler import auto_precision

    assert auto_precision(bb) == latest.kind and len(calls) == 2


def test_other_cpu_features_are_measured_again(bb, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(kernels, "measure", lambda backbone, kinds=(): calls.append(1) or {
        "fp32": {"ms_per_token": 10.0, "ppl_ratio": 1.0}, "w8": {"ms_per_token": 4.0, "ppl_ratio": 1.001},
        "w4": {"ms_per_token": 2.0, "ppl_ratio": 1.5}})
    a = kernels.choose(bb)
    assert a.kind == "w8" and "rejected for quality: w4" in a.reason
    real = kernels.cpu_features()
    monkeypatch.setattr(kernels, "cpu_features", lambda: {**real, "aten_capability": "OTHER"})
    b = kernels.choose(bb)
    assert b.key != a.key and len(calls) == 2
    assert set(json.loads((tmp_path / kernels.CACHE_FILE).read_text())) == {a.key, b.key}
    monkeypatch.setattr(kernels, "cpu_features", lambda: {**real, "torch": "0.0"})
    kernels.choose(bb)
    assert len(calls) == 3


def test_pick_keeps_exact_fp32_unless_clearly_faster():
    close = {"fp32": {"ms_per_token": 10.0, "ppl_ratio": 1.0}, "bf16": {"ms_per_token": 9.8, "ppl_ratio": 1.0}}
    assert kernels.pick(close)[0] == "fp32"
    bad = {"fp32": {"ms_per_token": 10.0, "ppl_ratio": 1.0}, "w4": {"ms_per_token": 3.0, "ppl_ratio": 1.03}}
    assert kernels.pick(bad)[0] == "fp32"


def test_bot_kernel_overrides_and_rejects_unknown(bb, monkeypatch):
    from bot.errors import BotError

    monkeypatch.setenv("BOT_KERNEL", "w4")
    assert kernels.choose(bb).kind == "w4"
    monkeypatch.setenv("BOT_KERNEL", "int3")
    with pytest.raises(BotError, match="Fix:"):
        kernels.choose(bb)


def test_damaged_cache_is_measured_again(bb, monkeypatch, tmp_path):
    (tmp_path / kernels.CACHE_FILE).write_text("{not json")
    monkeypatch.setattr(kernels, "measure", lambda backbone, kinds=(): {
        "fp32": {"ms_per_token": 10.0, "ppl_ratio": 1.0}})
    assert kernels.choose(bb).kind == "fp32"
    assert json.loads((tmp_path / kernels.CACHE_FILE).read_text())


@pytest.mark.parametrize("kind", ["w8f", "w4"])
def test_serving_engine_runs_new_kernels_with_per_row_adapters(bb, kind):
    import queue

    from bot.serve.sampling import SamplingParams
    from bot.serve.scheduler import Scheduler

    bb.add_adapter("other", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                       target_modules=list(DEFAULT_TARGET_MODULES)))
    s = Scheduler(bb, generators=["chat", "other"], precision=kind, max_batch=4)
    assert s.engine.dtype == kernels.activation_dtype(kind)
    s.eos = set()
    ids = bb.tokenizer("hello there")["input_ids"]
    done: queue.Queue = queue.Queue()
    reqs = [s.submit(ids, a, SamplingParams(max_tokens=6),
                     lambda ev: ev.finish_reason and done.put(1)) for a in ("chat", "other", None)]
    for _ in reqs:
        done.get(timeout=60)
    outs = [list(r.tokens) for r in reqs]
    assert all(len(o) == 6 for o in outs)
    assert outs[0] != outs[1], "rows did not get their own adapter"
    s.close()


def test_bot_info_says_which_kernel_and_why(bb, monkeypatch):
    from bot.info import kernel_lines

    monkeypatch.setattr(kernels, "measure", lambda backbone, kinds=(): {
        "fp32": {"ms_per_token": 10.0, "ppl_ratio": 1.0}, "w8": {"ms_per_token": 5.0, "ppl_ratio": 1.004}})
    first = "\n".join(kernel_lines(bb))
    assert "generation   w8 = int8 weight-only" in first and "2.00x" in first
    assert "measured now and saved" in first and "ATen kernels" in first
    assert "reused" in "\n".join(kernel_lines(bb))


def test_bot_info_says_which_decode_loop(bb, monkeypatch):
    from bot.info import decode_line

    monkeypatch.delenv("BOT_DECODE", raising=False)
    assert decode_line(bb).startswith("lean loop (bot.decode")
    monkeypatch.setenv("BOT_DECODE", "generate")
    assert decode_line(bb) == "transformers generate() (set by BOT_DECODE)"


def test_the_cli_offers_every_kernel():
    from bot import cli

    assert cli.KERNEL_KINDS == kernels.KINDS
