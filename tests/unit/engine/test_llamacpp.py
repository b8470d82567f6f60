"""bot.llamacpp: our LoRA adapters as GGUF LoRA files, and llama.cpp computing what PyTorch computes.

The file-format test always runs (it needs only the ``gguf`` package). The engine tests need
llama-cpp-python (``pip install -e '.[llamacpp]'``, or ``BOT_LLAMACPP_PATH`` naming a
site-packages that holds it) and are skipped with that note when it is absent.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_backbone
from peft import LoraConfig

from bot.engine import llamacpp
from bot.model.families import DEFAULT_TARGET_MODULES

NO_LLAMA = "llama-cpp-python is not installed: pip install -e '.[llamacpp]' (compiles ~15 min) or set BOT_LLAMACPP_PATH"


def _with_adapter(bb, name="chat", seed=0):
    torch.manual_seed(seed)
    bb.add_adapter(name, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                    target_modules=list(DEFAULT_TARGET_MODULES)))
    return bb


def test_lora_gguf_holds_every_layer_in_llama_cpp_layout(tmp_path):
    import gguf

    bb = _with_adapter(make_tiny_backbone())
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


@pytest.fixture(scope="module")
def real():
    from bot.model.backbone import Backbone

    return _with_adapter(Backbone.load(), "rand")


@needs_llama
@pytest.mark.integration
def test_llama_cpp_with_our_lora_predicts_what_pytorch_predicts(real):
    """Next-token argmax along a text: llama.cpp + GGUF LoRA vs PyTorch fp32 peft."""
    gen = llamacpp.LlamaCppGenerator(real, n_ctx=256)
    enc = real.tokenizer(["The lighthouse keeper climbed the narrow stairs every evening to light "
                          "the lamp, and ships far out at sea watched for its beam."], return_tensors="pt")
    with torch.inference_mode():
        torch_lora = real.forward(enc, "rand").logits[0].argmax(-1)
        torch_base = real.forward(enc, None).logits[0].argmax(-1)
    cpp_lora = gen.logits("rand")(enc)[0].argmax(-1)
    cpp_base = gen.logits(None)(enc)[0].argmax(-1)
    same_lora = (cpp_lora == torch_lora).float().mean().item()
    same_base = (cpp_base == torch_base).float().mean().item()
    assert same_base >= 0.85, same_base  # Q4_1 weights = our de-quantized fp32 weights
    assert same_lora >= 0.85, same_lora  # the adapter is applied with the right layout and scale
    assert (torch_lora != torch_base).any(), "the random adapter must change predictions"


@needs_llama
@pytest.mark.integration
def test_llama_cpp_generates_exact_lengths_and_stops_at_eos(real):
    gen = llamacpp.LlamaCppGenerator(real, n_ctx=256)
    ids = real.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"]
    assert len(gen.generate(ids, "rand", 12, suppress_eos=True)) == 12
    reply = gen.generate(ids, None, 200)
    assert 0 < len(reply) <= 200 and gen.engine(None).token_eos() not in reply


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


@needs_llama
@pytest.mark.integration
def test_chat_replies_run_on_llama_cpp_with_the_adapter(real, tmp_path):
    """`bot chat --engine llamacpp`: the session's streamed reply is llama.cpp's greedy reply."""
    from helpers import HashEncoder

    from bot import ChatSession, Router
    from bot.chat import REPETITION_PENALTY
    from bot.manifests.spec import AdapterSpec
    from bot.tasks.generate import GenerateTask

    gen = llamacpp.chat_engine(real, "llamacpp")
    assert isinstance(gen, llamacpp.LlamaCppGenerator)
    spec = AdapterSpec.from_dict({"name": "rand", "kind": "generate", "template": ""},
                                 tmp_path / "rand" / "adapter.yaml")
    router = Router(HashEncoder(), per_adapter_k=3)
    router.add_route("rand", ["hello how are you", "tell me a joke"])
    task = GenerateTask(spec, real)
    session = ChatSession(real, {"rand": task}, router, max_new_tokens=16, llama=gen)
    # llama.cpp reuses a cached prompt prefix and then re-evaluates only the last prompt
    # token, whose logits then round differently than in a full prompt batch: start both cold
    gen.engine("rand").reset()
    turn = session.send("Say hi.")
    ids = task.prompt_ids("Say hi.", [])[0].tolist()
    gen.engine("rand").reset()
    expected = gen.generate(ids, "rand", 16, repetition_penalty=REPETITION_PENALTY)
    assert expected and turn.reply == real.tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert turn.adapter == "rand" and session.fork().llama is gen
