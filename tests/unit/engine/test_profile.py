"""bot.engine.profile: a step's time split into body, head, LoRA, attention and other ops."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_model, make_tokenizer
from peft import LoraConfig

from bot.engine.profile import BUCKETS, bucket, render_profile, step_profile
from bot.engine.runner import make_runner
from bot.model.backbone import Backbone
from bot.model.families import DEFAULT_TARGET_MODULES

LAYERS, GROUPS = 2, 4


@pytest.fixture(scope="module")
def runner():
    # hidden 64: every weight matmul is wider than the LoRA stack (r 4: at most 12 columns)
    bb = Backbone.from_model(make_tiny_model(hidden=64, layers=LAYERS), make_tokenizer())
    torch.manual_seed(1)
    bb.add_adapter("a", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                   target_modules=list(DEFAULT_TARGET_MODULES)))
    run = make_runner(bb, "fp32", 4, 256)
    run.add_adapter("a")
    return run


def test_buckets_add_up_and_each_kind_of_work_is_found(runner):
    p = step_profile(runner, 4, context=20, adapter="a", steps=3)
    assert set(p["ms"]) == set(BUCKETS)
    assert abs(sum(p["ms"].values()) - p["profiled_ms"]) < 0.05
    for b in ("body", "head", "lora", "attention"):
        assert p["ms"][b] > 0 and p["ops_per_step"][b] > 0, (b, p)
    # each layer group adds h @ A and then the B product: two LoRA matmuls at least
    assert p["ops_per_step"]["lora"] >= 2 * GROUPS * LAYERS
    # q/k/v, o, gate/up and down per layer, all fp32 matmuls
    assert p["ops_per_step"]["body"] >= GROUPS * LAYERS
    assert p["kernel"] == "fp32" and p["rows"] == 4 and p["step_ms"] > 0


def test_a_base_only_batch_spends_nothing_on_lora(runner):
    p = step_profile(runner, 2, context=10, adapter=None, steps=2)
    assert p["ms"]["lora"] == 0 and p["ops_per_step"]["lora"] == 0
    assert p["ms"]["body"] > 0


@pytest.mark.parametrize("name,shapes,expected", [
    ("aten::_weight_int8pack_mm", [[1, 576], [3072, 576], [3072]], "body"),
    ("aten::mm", [[16, 576], [576, 3072]], "body"),
    ("aten::mm", [[16, 576], [576, 24]], "lora"),
    ("aten::addmm_", [[16, 3072], [16, 16], [16, 3072]], "lora"),
    ("aten::bmm", [[48, 3, 64], [48, 64, 151]], "attention"),
    ("aten::matmul", [[16, 3, 3, 64], [16, 3, 64, 151]], "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", [[1, 9, 1, 64]], "attention"),
    ("quantized::linear_dynamic_fp16", [[16, 576], []], "head"),
    ("aten::mm", [[16, 576], [576, 49152]], "head"),
    ("aten::rms_norm", [[16, 576], [], [576], []], "other"),
    ("bot::attention", [], "attention"),
    ("bot::rms_norm", [], "other"),
])
def test_each_op_goes_to_its_bucket(name, shapes, expected):
    assert bucket(name, shapes, vocab=49152, rank=24) == expected


def test_the_table_has_a_row_per_batch_with_shares():
    p = {"rows": 16, "kernel": "bf16h", "step_ms": 63.0, "profiled_ms": 60.0,
         "ms": {"body": 30.0, "head": 6.0, "lora": 3.0, "attention": 12.0, "other": 9.0},
         "ops_per_step": {"body": 120, "head": 1, "lora": 96, "attention": 120, "other": 1400}}
    lines = render_profile([p])
    assert len(lines) == 3 and "30.0 (50%)" in lines[2] and "1400 / 1737" in lines[2]
