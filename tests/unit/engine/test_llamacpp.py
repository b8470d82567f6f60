"""bot.engine.llamacpp: our LoRA adapters as GGUF LoRA files, and llama.cpp computing what PyTorch computes.

The file-format test always runs (it needs only the ``gguf`` package). The engine tests need
llama-cpp-python (``pip install -e '.[llamacpp]'``, or ``BOT_LLAMACPP_PATH`` naming a
site-packages that holds it) and are skipped with that note when it is absent.
"""

from __future__ import annotations

import pytest
import torch
from helpers import NO_LLAMA, make_tiny_backbone, with_random_lora

from bot.engine import llamacpp


def test_lora_gguf_holds_every_layer_in_llama_cpp_layout(tmp_path):
    import gguf

    bb = with_random_lora(make_tiny_backbone())
    path = llamacpp.write_lora_gguf(bb, "chat", tmp_path / "chat.gguf")
    reader = gguf.GGUFReader(str(path))

    def field(key):
        f = reader.fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]

    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    assert float(field("adapter.lora.alpha")) == pytest.approx(8.0)  # scaling 2 x r 4
    tensors = {t.name: t for t in reader.tensors}
    config = bb.base.config
    n_layers = config.num_hidden_layers
    assert len(tensors) == 2 * 7 * n_layers
    layer = bb.base.model.layers[1]
    q_a = layer.self_attn.q_proj.lora_A["chat"].weight.detach()
    q_b = layer.self_attn.q_proj.lora_B["chat"].weight.detach()
    a = torch.from_numpy(tensors["blk.1.attn_q.weight.lora_a"].data.copy()).reshape(q_a.shape)
    b = torch.from_numpy(tensors["blk.1.attn_q.weight.lora_b"].data.copy()).reshape(q_b.shape)
    assert torch.equal(a, q_a)
    # rows of q's B follow llama.cpp's rotary order: a permutation of ours, not ours
    assert not torch.equal(b, q_b)
    assert torch.equal(llamacpp._permute_rows(q_b, config.num_attention_heads), b)
    assert sorted(b.sum(1).tolist()) == pytest.approx(sorted(q_b.sum(1).tolist()))
    v_b = layer.self_attn.v_proj.lora_B["chat"].weight.detach()
    v = torch.from_numpy(tensors["blk.1.attn_v.weight.lora_b"].data.copy()).reshape(v_b.shape)
    assert torch.equal(v, v_b)  # v is stored as is


def test_engine_refuses_clearly_without_llama_cpp(monkeypatch):
    from bot.errors import BotError

    monkeypatch.setattr(llamacpp, "import_llama_cpp", lambda: None)
    with pytest.raises(BotError, match=r"Fix: pip install -e '\.\[llamacpp\]'"):
        llamacpp.LlamaCppGenerator(make_tiny_backbone())


needs_llama = pytest.mark.skipif(llamacpp.import_llama_cpp() is None, reason=NO_LLAMA)


def test_chat_engine_is_chosen_by_flag_or_env_and_falls_back_with_the_reason(monkeypatch, caplog):
    from bot.errors import BotError

    bb = make_tiny_backbone()
    monkeypatch.delenv("BOT_ENGINE", raising=False)
    assert llamacpp.chat_engine(bb) is None and llamacpp.chat_engine(bb, "torch") is None
    monkeypatch.setenv("BOT_ENGINE", "cuda-graphs")
    with pytest.raises(BotError, match=r"BOT_ENGINE=cuda-graphs is not an engine\. Fix: use one of torch, llamacpp"):
        llamacpp.chat_engine(bb)
    monkeypatch.setenv("BOT_ENGINE", "llamacpp")
    monkeypatch.setattr(llamacpp, "import_llama_cpp", lambda: None)
    with caplog.at_level("WARNING", logger="bot.engine.llamacpp"):
        assert llamacpp.chat_engine(bb) is None
    assert "replies use the PyTorch fast path" in caplog.text and "pip install -e '.[llamacpp]'" in caplog.text


@needs_llama
def test_chat_engine_without_a_gguf_source_falls_back(caplog):
    with caplog.at_level("WARNING", logger="bot.engine.llamacpp"):
        assert llamacpp.chat_engine(make_tiny_backbone(), "llamacpp") is None
    assert "not converted from a GGUF file" in caplog.text
