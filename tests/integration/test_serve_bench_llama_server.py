"""`bot bench --serve --against llama-server` against the real binary that ``scripts/build-llama-server.sh`` puts in
``$BOT_CACHE/llama-server/native/`` (marked `integration`; skipped, with the reason, when it is not there).
"""

from __future__ import annotations

import pytest
from helpers import REPO

from bot.eval import llama_server as ls
from bot.serve import load_bench

ROOT = REPO


@pytest.mark.integration
@pytest.mark.skipif(ls.missing_reason("native") is not None,
                    reason=ls.missing_reason("native") or "")
def test_real_llama_server_serves_base_and_each_adapter_by_the_lora_field(tmp_path):
    from bot.model.backbone import Backbone

    bb = Backbone.load()
    bb.load_adapter("chat", ROOT / "adapters" / "chat")
    loras = ls.write_loras(bb, {"chat": "chat", "chat2": "chat"}, tmp_path)
    model = ls.model_gguf(bb)
    server, extra = ls.start_server(ls.find_binary("native"), model, loras, load_bench._free_port(),
                                    tmp_path / "llama-server.log", parallel=4, ctx_per_slot=256)
    prompt = "Hi! How was your weekend?"
    jobs = [(bb.info.name, prompt), ("chat", prompt), ("chat2", prompt)]
    with server:
        lv = load_bench.run_level(server.base_url, jobs, 3, 16,
                             extra_body=lambda m: {"lora": ls.lora_field(m, list(loras))},
                             server_pid=server.proc.pid)
    assert lv["failed"] == 0, lv["errors"]
    assert 0 < lv["tokens"] <= 3 * 16 and lv["tokens_per_s"] > 0
    texts = lv["texts"]
    assert texts[1] == texts[2]  # the same weights under two ids
    assert texts[0] != texts[1]  # the lora field switched the adapter on
    assert lv["mean_prompt_tokens"] > 10  # the chat template was applied
