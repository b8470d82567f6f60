"""llama.cpp on the real backbone computes what PyTorch computes, with our GGUF LoRA (marked `integration`).

They need llama-cpp-python (``pip install -e '.[llamacpp]'``, or ``BOT_LLAMACPP_PATH`` naming a
site-packages that holds it) and are skipped with that note when it is absent.
"""

from __future__ import annotations

import pytest
import torch
from helpers import NO_LLAMA, with_random_lora

from bot.engine import llamacpp

needs_llama = pytest.mark.skipif(llamacpp.import_llama_cpp() is None, reason=NO_LLAMA)


@pytest.fixture(scope="module")
def real():
    from bot.model.backbone import Backbone

    return with_random_lora(Backbone.load(), "rand")


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
