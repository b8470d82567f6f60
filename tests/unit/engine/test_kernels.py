"""bot.engine.precision / tuning: every kernel computes the same model; the choice is measured once per key and cached."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_tiny_backbone, make_tiny_model
from peft import LoraConfig

from bot.engine import Scheduler, tuning
from bot.engine import precision as kernels
from bot.model.families import DEFAULT_TARGET_MODULES


def _m(ms: float, ppl: float, ms16: float | None = None) -> dict:
    """A fake measurement: ``ms`` per step at 1 token (``ms16`` at 16, default 4x)."""
    big = ms16 if ms16 is not None else 4 * ms
    return {"ms": {"1": ms, "4": ms * 1.5, "8": (ms + big) / 2, "16": big}, "ppl_ratio": ppl}


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
    ids = _ids(bb)
    s = Scheduler(bb, generators=["chat"], precision="fp32")
    runner = s.runner
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def ppl(k):
        logits = runner.sequence_logits(enc, ["chat"], kind=k)[0, :-1]
        return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp())

    ref = ppl("fp32")
    assert ppl(kind) == pytest.approx(ref, rel=kernels.MAX_PPL_RATIO - 1)
    assert kernels.activation_dtype(kind) == (torch.float32 if kind in ("fp32", "w8f", "q8", "q8h") else torch.bfloat16)
    s.close()


def test_int4_layer_matches_dequantized_weights():
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    layer = kernels.Int4WeightLinear(w, None)
    x = torch.randn(3, 96)
    # weights already on the int4 grid of each group (Q4_1-like) round-trip up to bf16 scales
    assert (layer(x).float() - x @ w.T).abs().max() < 0.1 * (x @ w.T).abs().max()


def test_choice_is_measured_once_cached_and_reused(bb, monkeypatch, tmp_path):
    calls = []
    real = tuning.measure

    def counting(backbone, kinds=kernels.CANDIDATES, rounds=5):
        calls.append(kinds)
        return real(backbone, kinds=kinds, rounds=1)

    monkeypatch.setattr(tuning, "measure", counting)
    first = tuning.choose(bb)
    assert not first.cached and len(calls) == 1
    assert {first.small, first.large} <= set(kernels.KINDS) and first.small in first.reason
    assert set(first.measured) >= {"fp32", "w8"}
    data = json.loads((tmp_path / kernels.CACHE_FILE).read_text())
    assert data[first.key]["small"] == first.small and data[first.key]["large"] == first.large
    again = tuning.choose(bb)
    assert again.cached and again.kind == first.kind and len(calls) == 1
    # a choice cached by a bot with other candidates is measured again
    data[first.key]["candidates"] = ["fp32", "w8"]
    (tmp_path / kernels.CACHE_FILE).write_text(json.dumps(data))
    assert not tuning.choose(bb).cached and len(calls) == 2
    latest = tuning.choose(bb)  # timed again on a tiny model: it may pick another kernel
    assert latest.cached and len(calls) == 2
    # the serving engine takes the same (cached) choice
    assert Scheduler(bb, precision="auto").precision == latest.kind and len(calls) == 2


def test_other_cpu_features_are_measured_again(bb, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(tuning, "measure", lambda backbone, kinds=(): calls.append(1) or {
        "fp32": _m(10.0, 1.0), "w8": _m(4.0, 1.001),
        "w4": _m(2.0, 1.5)})
    a = tuning.choose(bb)
    assert a.kind == "w8" and "rejected for quality: w4" in a.reason
    real = tuning.cpu_features()
    monkeypatch.setattr(tuning, "cpu_features", lambda: {**real, "aten_capability": "OTHER"})
    b = tuning.choose(bb)
    assert b.key != a.key and len(calls) == 2
    assert set(json.loads((tmp_path / kernels.CACHE_FILE).read_text())) == {a.key, b.key}
    monkeypatch.setattr(tuning, "cpu_features", lambda: {**real, "torch": "0.0"})
    tuning.choose(bb)
    assert len(calls) == 3


def test_pick_keeps_exact_fp32_unless_clearly_faster():
    close = {"fp32": _m(10.0, 1.0), "bf16": _m(9.8, 1.0)}
    assert tuning.pick(close)[0] == "fp32"
    bad = {"fp32": _m(10.0, 1.0), "w4": _m(3.0, 1.03)}
    assert tuning.pick(bad)[0] == "fp32"


def test_bot_kernel_overrides_and_rejects_unknown(bb, monkeypatch):
    from bot.errors import BotError

    monkeypatch.setenv("BOT_KERNEL", "w4")
    assert tuning.choose(bb).kind == "w4"
    monkeypatch.setenv("BOT_KERNEL", "int3")
    with pytest.raises(BotError, match="Fix:"):
        tuning.choose(bb)


def test_damaged_cache_is_measured_again(bb, monkeypatch, tmp_path):
    (tmp_path / kernels.CACHE_FILE).write_text("{not json")
    monkeypatch.setattr(tuning, "measure", lambda backbone, kinds=(): {
        "fp32": _m(10.0, 1.0)})
    assert tuning.choose(bb).kind == "fp32"
    assert json.loads((tmp_path / kernels.CACHE_FILE).read_text())


@pytest.mark.parametrize("kind", ["w8f", "w4"])
def test_serving_engine_runs_new_kernels_with_per_row_adapters(bb, kind):
    import queue

    from bot.engine import SamplingParams

    bb.add_adapter("other", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                       target_modules=list(DEFAULT_TARGET_MODULES)))
    s = Scheduler(bb, generators=["chat", "other"], precision=kind, max_batch=4)
    assert s.precision == kind and s.runner.weights[kind].dtype == kernels.activation_dtype(kind)
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
    from bot.model.info import kernel_lines

    monkeypatch.setattr(tuning, "measure", lambda backbone, kinds=(): {
        "fp32": _m(10.0, 1.0), "w8": _m(5.0, 1.004)})
    first = "\n".join(kernel_lines(bb))
    assert "generation   w8 = int8 weight-only" in first and "2.00x" in first
    assert "measured now and saved" in first and "ATen kernels" in first
    assert "reused" in "\n".join(kernel_lines(bb))


def test_bot_info_says_which_step_runs(bb):
    from helpers import make_tiny_family

    from bot.model.info import decode_line

    assert decode_line(bb).startswith("lean batched step")
    bb.base = make_tiny_family("gpt2")
    assert "transformers forward (no lean step for model type 'gpt2'" in decode_line(bb)


def test_the_cli_offers_every_kernel():
    from bot import cli

    assert cli.KERNEL_KINDS == kernels.KINDS


def test_serve_precision_takes_a_kernel_pair_and_refuses_others(capsys):
    from bot import cli

    args = cli.build_parser().parse_args(["serve", "--precision", "W8,bf16"])
    assert args.precision == "w8,bf16" and tuning.parse(args.precision) == ("w8", "bf16")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--precision", "w8,int3"])
    assert "'w8,int3' is not a kernel" in capsys.readouterr().err
