"""Fast generation with one adapter: merge it, then shrink the weights.

Decoding one token at batch size 1 on a CPU is bound by memory bandwidth: every
step reads every weight. So (figures in reports/bench.md and the README's Design):
* an unmerged peft adapter adds a LoRA detour to every linear layer (slower than base);
* merging the adapter into a copy of the weights removes that cost entirely;
* bfloat16 halves the bytes read, int8 weight-only (per output channel, bf16
  activations, ``torch._weight_int8pack_mm``) quarters them, with held-out reply
  perplexity close to float32. Dynamic int8 quantization of activations (torch.ao
  ``quantize_dynamic``) was also tried: fast, but it ruined perplexity, so it is not offered.

An "engine" is a plain (peft-free) model holding base + one merged adapter in the
chosen precision. Engines are built on first use and kept in a small LRU cache, so
the backbone's own fp32 weights (used for training and classification) are never
modified.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from torch import nn

MODES = ("w8", "bf16", "fp32")
DEFAULT_MODE = "w8"


class Int8WeightLinear(nn.Module):
    """A frozen linear layer with int8 weights (one scale per output row), bf16 in/out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16),
                                      self.qweight, self.scale)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_w8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear (lm_head included) by Int8WeightLinear; the rest goes bf16."""
    model.to(torch.bfloat16)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8WeightLinear(child.weight, child.bias))
    return model


def merged_state_dict(backbone, adapter: str | None) -> dict[str, torch.Tensor]:
    """Base weights with ``adapter``'s LoRA delta added, without touching the backbone."""
    out = {}
    with backbone.lock:
        lora_layers = {}
        if backbone.peft is not None:
            from peft.tuners.lora import LoraLayer

            for name, mod in backbone.base.named_modules():
                if isinstance(mod, LoraLayer):
                    lora_layers[name] = mod
        for key, tensor in backbone.base.state_dict().items():
            if "lora_" in key:
                continue
            clean = key.replace(".base_layer.", ".")
            owner = key.rsplit(".base_layer.", 1)[0] if ".base_layer." in key else None
            value = tensor
            if (adapter is not None and owner in lora_layers and key.endswith("base_layer.weight")
                    and adapter in lora_layers[owner].lora_A):
                value = tensor + lora_layers[owner].get_delta_weight(adapter).to(tensor.dtype)
            out[clean] = value.detach().clone()
    return out


def build_engine(backbone, adapter: str | None, mode: str) -> nn.Module:

    if mode not in MODES:
        raise ValueError(f"unknown fast mode '{mode}'; choose one of {MODES}")
    from .arch import model_from_weights

    model = model_from_weights(backbone, merged_state_dict(backbone, adapter))
    device = backbone.device
    if mode == "w8" and device.type == "cuda":
        mode = "bf16"  # torch's int8 weight-only kernel is a CPU/MPS kernel
    if mode == "bf16":
        model.to(torch.bfloat16)
    elif mode == "w8":
        quantize_w8(model)
    model.to(device)
    model.generation_config = backbone.base.generation_config
    return model


class FastGenerator:
    """Generate on one adapter through a cached merged/quantized engine.

    Args:
        backbone: the Backbone whose weights and adapters are used.
        mode: "w8" (default), "bf16" or "fp32" (merged only).
        max_engines: engines kept in memory (reports/bench.md gives the size of one).
    """

    def __init__(self, backbone, mode: str = DEFAULT_MODE, max_engines: int = 3):
        self.backbone = backbone
        self.mode = mode
        self.max_engines = max_engines
        self._engines: OrderedDict[tuple, nn.Module] = OrderedDict()
        self._lock = threading.RLock()

    def engine(self, adapter: str | None) -> nn.Module:
        key = (adapter, self.mode)
        with self._lock:
            if key in self._engines:
                self._engines.move_to_end(key)
                return self._engines[key]
            model = build_engine(self.backbone, adapter, self.mode)
            self._engines[key] = model
            while len(self._engines) > self.max_engines:
                self._engines.popitem(last=False)
            return model

    def invalidate(self, adapter: str | None) -> None:
        """Forget engines built from ``adapter`` (it was reloaded, retrained or dropped)."""
        with self._lock:
            for key in [k for k in self._engines if k[0] == adapter]:
                del self._engines[key]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, adapter: str | None = None, **kwargs) -> torch.Tensor:
        """``model.generate`` on the engine for ``adapter``; returns only the new tokens."""
        if adapter is not None and adapter not in self.backbone.adapters:
            from .errors import AdapterError

            raise AdapterError(f"adapter '{adapter}' is not loaded; loaded: {self.backbone.adapters}")
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", self.backbone.tokenizer.pad_token_id)
        input_ids = input_ids.to(self.backbone.device)
        mask = torch.ones_like(input_ids)
        if self.backbone.quantized:  # 8/4-bit: no plain weights to merge; decode unmerged
            with self.backbone.lock:
                out = self._unmerged(adapter).generate(input_ids=input_ids, attention_mask=mask,
                                                       **kwargs)
            return out[:, input_ids.shape[1]:].cpu()
        model = self.engine(adapter)
        with self._lock:  # one decode at a time: both cores go to it
            out = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        return out[:, input_ids.shape[1]:].cpu()

    def _unmerged(self, adapter: str | None):
        """The backbone's own (peft) model set to ``adapter``; the caller holds its lock."""
        peft = self.backbone.peft
        if peft is None:
            return self.backbone.base
        if adapter is None:
            return _AdapterOff(peft)
        peft.set_adapter(adapter)
        return peft


class _AdapterOff:
    """``generate`` on a peft model with its adapters disabled."""

    def __init__(self, peft):
        self.peft = peft

    def generate(self, **kwargs):
        with self.peft.disable_adapter():
            return self.peft.generate(**kwargs)
