"""`bot bench`'s measuring and rendering on the tiny backbone (figures are not asserted, shapes are)."""

from __future__ import annotations

import pytest
from conftest import make_tiny_backbone
from peft import LoraConfig

from bot.eval import bench
from bot.spec import DEFAULT_TARGET_MODULES


@pytest.fixture
def bb():
    import torch

    backbone = make_tiny_backbone()
    torch.manual_seed(0)
    backbone.add_adapter("chat", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=list(DEFAULT_TARGET_MODULES)))
    return backbone


def test_quality_rows_score_the_same_replies_on_every_path(bb):
    rows = bench.measure_quality(bb, "chat", n_rows=6)
    assert [label for label, _ in rows] == ["fp32 peft unmerged", "fast path bf16", "fast path w8"]
    fp32 = rows[0][1]
    assert fp32 > 1
    for _, ppl in rows[1:]:  # the merged engines compute the same model in lower precision
        assert ppl == pytest.approx(fp32, rel=0.05)


def test_render_takes_keywords_and_writes_every_section(bb):
    gen = bench.measure_generation(bb, "chat", 4)
    mixed, seq = bench.measure_mixed(bb, ["chat"], repeats=1)
    text = bench.render(command_line="bot bench --tokens 4", tokens=4, load={"cold": 2.0, "cached": 0.5},
                        gen=gen, quality=[("fp32 peft unmerged", 20.0), ("fast path w8", 20.2)],
                        mixed_info=(mixed, seq, ["chat"]), names=["chat"], bb=bb,
                        backbone_bytes=10**6, rss0=100.0)
    assert "Command: `bot bench --tokens 4`" in text and "CPU cores" in text
    for section in ("## Load", "## Generation (4-token", "## Mixed batch", "## Memory"):
        assert section in text
    assert "| cached safetensors load | 0.50 | 0.250 |" in text
    assert "| fast path w8 | 20.20 | 1.010 |" in text
    assert "| adapter 'chat' LoRA tensors |" in text
