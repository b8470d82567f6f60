"""bot.decode: the lean greedy loop gives generate()'s tokens, with generate()'s rules."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_backbone, make_tiny_family, make_tiny_model
from peft import LoraConfig

from bot import decode, fastgen
from bot.spec import DEFAULT_TARGET_MODULES


def _backbone(model=None):
    from bot.arch import lora_targets

    bb = make_tiny_backbone()
    bb.base = model if model is not None else make_tiny_model(hidden=64)
    torch.manual_seed(0)
    bb.add_adapter("chat", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                      target_modules=lora_targets(bb.base, list(DEFAULT_TARGET_MODULES))))
    return bb


@pytest.fixture
def bb(monkeypatch, tmp_path):
    monkeypatch.setenv("BOT_CACHE", str(tmp_path))
    monkeypatch.delenv("BOT_DECODE", raising=False)
    return _backbone()


def _prompt(bb, text="the lighthouse keeper climbed the stairs"):
    return bb.tokenizer(text, return_tensors="pt")["input_ids"]


def _reference(model, ids, **kwargs):
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             pad_token_id=0, **kwargs)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("kind", ["fp32", "bf16", "w8", "w8f", "w8h", "bf16h"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_lean_greedy_tokens_equal_generate(bb, kind, penalty):
    """The engine's replies through the lean loop equal transformers' generate() on it."""
    fast = fastgen.FastGenerator(bb, mode=kind)
    engine = fast.engine("chat")
    ids = _prompt(bb)
    opts = dict(max_new_tokens=40, min_new_tokens=40, repetition_penalty=penalty)
    ref = _reference(engine, ids, **opts)  # before the lean loop fuses the engine's weights
    assert fastgen.decode_loop(engine, opts) == "lean"
    got = fast.generate(ids, adapter="chat", **opts)[0].tolist()
    assert isinstance(engine.bot_lean_decoder, decode.LeanDecoder)
    if kind == "fp32":
        assert got == ref  # exact
    else:
        # fused matmuls may round differently in bf16: a reply may only part from generate()'s
        # where generate() itself nearly tied (this random tiny model's logits are close)
        same = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref))
        if same < len(ref):
            prefix = torch.cat([ids, torch.tensor([ref[:same]], dtype=torch.long)], 1)
            with torch.inference_mode():
                logits = engine(input_ids=prefix).logits[0, -1].float().clone()
            if penalty != 1.0:  # the scores generate() compared
                seen = torch.zeros_like(logits, dtype=torch.bool)
                seen[prefix[0]] = True
                logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
            gap = float(logits[ref[same]] - logits[got[same]])
            assert abs(gap) < 0.02 * float(logits.std()), (same, gap, got, ref)
    # the fused weights are views: the engine still runs through transformers, unchanged
    assert _reference(engine, ids, **opts) == ref


def test_lean_loop_stops_at_eos_and_honours_min_new_tokens(bb):
    fast = fastgen.FastGenerator(bb, mode="fp32")
    engine = fast.engine("chat")
    ids = _prompt(bb)
    free = _reference(engine, ids, max_new_tokens=12)
    eos = free[3]  # pretend the fourth greedy token ends the sequence
    first = free.index(eos)
    ref = _reference(engine, ids, max_new_tokens=12, eos_token_id=eos)
    got = fast.generate(ids, adapter="chat", max_new_tokens=12, eos_token_id=eos)[0].tolist()
    assert got == ref == free[:first + 1]  # stops after the end-of-sequence id, which it keeps
    ref = _reference(engine, ids, max_new_tokens=12, min_new_tokens=12, eos_token_id=eos)
    got = fast.generate(ids, adapter="chat", max_new_tokens=12, min_new_tokens=12, eos_token_id=eos)
    assert got[0].tolist() == ref and len(ref) == 12 and eos not in ref


def test_lean_loop_streams_like_generate(bb):
    from transformers import TextIteratorStreamer

    fast = fastgen.FastGenerator(bb, mode="fp32")
    ids = _prompt(bb)
    streamer = TextIteratorStreamer(bb.tokenizer, skip_prompt=True)
    new = fast.generate(ids, adapter="chat", max_new_tokens=10, streamer=streamer)
    assert "".join(streamer) == bb.tokenizer.decode(new[0])


def test_other_options_and_architectures_keep_generate(bb, monkeypatch):
    engine = fastgen.FastGenerator(bb, mode="fp32").engine("chat")
    assert fastgen.decode_loop(engine, {"max_new_tokens": 4, "do_sample": True}) == "generate"
    assert fastgen.decode_loop(engine, {"max_new_tokens": 4, "num_beams": 2}) == "generate"
    monkeypatch.setenv("BOT_DECODE", "generate")
    assert fastgen.decode_loop(engine, {"max_new_tokens": 4}) == "generate"
    monkeypatch.delenv("BOT_DECODE")
    gpt2 = _backbone(make_tiny_family("gpt2"))
    assert fastgen.decode_loop(fastgen.FastGenerator(gpt2, mode="fp32").engine("chat"), {}) == "generate"


def test_qwen2_with_qkv_bias_decodes_exactly(monkeypatch, tmp_path):
    monkeypatch.setenv("BOT_CACHE", str(tmp_path))
    bb = _backbone(make_tiny_family("qwen2", hidden=64))
    fast = fastgen.FastGenerator(bb, mode="fp32")
    engine = fast.engine("chat")
    ids = _prompt(bb)
    ref = _reference(engine, ids, max_new_tokens=30, min_new_tokens=30)
    assert fast.generate(ids, adapter="chat", max_new_tokens=30, min_new_tokens=30)[0].tolist() == ref
