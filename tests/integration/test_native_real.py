"""The compiled decode loop on the real backbone with the committed chat adapter: token by token,
teacher-forced, its perplexity equals the Python step's in float32 and stays within the
kernel gate (1.02x float32) in the kernels `bot serve` picks (marked `integration`)."""

from __future__ import annotations

import math

import pytest
import torch

from bot.engine import native
from bot.engine.lean import Segment
from bot.engine.precision import MAX_PPL_RATIO, PROBE_TEXT
from bot.engine.runner import make_runner
from bot.util.assets import repo_root

pytestmark = pytest.mark.integration
PREFIX = 8  # a first chunk, then one decoding step per token


@pytest.fixture(scope="module")
def bb():
    from bot.model.backbone import Backbone

    torch.set_num_threads(2)
    backbone = Backbone.load()
    backbone.load_adapter("chat", repo_root() / "adapters" / "chat")
    return backbone


def _decode_ppl(bb, ids, kind: str, compiled: bool) -> tuple[float, list[int]]:
    runner = make_runner(bb, kind, 2, 512)
    runner.add_adapter("chat")
    runner.lean.native_ok = compiled
    nll, greedy = 0.0, []
    with torch.inference_mode():
        logits = runner.step([Segment(0, 0, ids[:PREFIX], "chat")])
        for i in range(PREFIX, len(ids)):
            nll -= torch.log_softmax(logits[0], -1)[ids[i]].item()
            greedy.append(int(logits[0].argmax()))
            logits = runner.step([Segment(0, i, [ids[i]], "chat")])
    return math.exp(nll / (len(ids) - PREFIX)), greedy


def test_compiled_loop_keeps_decode_perplexity(bb):
    if native.module() is None:
        pytest.skip(f"the compiled loop is not available here: {native.reason()}")
    ids = bb.tokenizer(PROBE_TEXT)["input_ids"]
    assert len(ids) > 100
    ref, ref_greedy = _decode_ppl(bb, ids, "fp32", compiled=False)
    fp32, fp32_greedy = _decode_ppl(bb, ids, "fp32", compiled=True)
    assert fp32 == pytest.approx(ref, rel=1e-4)
    assert fp32_greedy == ref_greedy
    auto, _ = _decode_ppl(bb, ids, "auto", compiled=True)
    assert auto / ref <= MAX_PPL_RATIO, (auto, ref)
    assert 5 < ref < 60  # a sane model on plain English
