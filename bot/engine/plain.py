"""The backbone's base model without peft: shared tensors, one place."""

from __future__ import annotations

import torch

from bot.errors import BackboneError
from bot.model.families import model_from_weights


def plain_state(backbone) -> dict[str, torch.Tensor]:
    """The backbone's base weights under plain (peft-free) names, without copying."""
    out = {}
    for key, tensor in backbone.base.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = tensor
    return out


def plain_model(backbone) -> torch.nn.Module:
    """A peft-free model whose parameters are the backbone's own tensors (no copy)."""
    if backbone.quantized:
        raise BackboneError(f"the engine cannot run a {backbone.load_in} (bitsandbytes) backbone: "
                            "it rebuilds the model from plain weights. Fix: load the backbone "
                            "with --load-in bf16 (or fp32) to chat or serve")
    with backbone.lock:
        model = model_from_weights(backbone, plain_state(backbone))
    model.requires_grad_(False)
    return model
