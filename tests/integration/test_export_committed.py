"""`bot export` of the committed chat adapter on the real backbone decodes like bot (marked `integration`)."""

from __future__ import annotations

import pytest
import torch
from helpers import EngineGenerator

from bot.export.vllm import export
from bot.manifests.spec import AdapterSpec


@pytest.mark.integration
def test_committed_chat_adapter_exports_and_decodes_like_bot(tmp_path):
    """The real embedded backbone: the committed `chat` adapter via plain peft, 2 prompts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bot.manifests.registry import load_task
    from bot.model.backbone import Backbone
    from bot.util.assets import repo_root

    adapters = repo_root() / "adapters"
    bb = Backbone.load()
    task = load_task(bb, AdapterSpec.from_dir(adapters / "chat"))
    out = tmp_path / "out"
    manifest = export(["chat"], out, backbone=bb, adapters_dir=adapters)
    assert manifest["generate"]["chat"]["rank"] == 8 and manifest["max_lora_rank"] == 8
    fast = EngineGenerator(bb, "fp32")
    model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(model, out / "chat").eval()
    tok = AutoTokenizer.from_pretrained(out / "base")  # what vLLM tokenizes with
    for prompt in ["Hi there, how are you today?", "What should I cook for dinner tonight?"]:
        ids = task.prompt_ids(prompt)
        assert tok.apply_chat_template(task.messages(prompt), add_generation_prompt=True,
                                       return_dict=True, return_tensors="pt")["input_ids"].tolist() \
            == ids.tolist()
        kwargs = {"max_new_tokens": 8, "repetition_penalty": 1.1}
        ours = fast.generate(ids, adapter="chat", **kwargs)[0].tolist()
        with torch.inference_mode():
            theirs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    do_sample=False, pad_token_id=bb.tokenizer.pad_token_id,
                                    **kwargs)[0, ids.shape[1]:].tolist()
        assert theirs == ours, (prompt, bb.tokenizer.decode(ours), bb.tokenizer.decode(theirs))
