"""Fast generation with one adapter: merge it, then shrink the weights.

Decoding one token at batch size 1 on a CPU is bound by memory bandwidth: every
step reads every weight. So (figures in reports/bench.md and the README's Design):
* an unmerged peft adapter adds a LoRA detour to every linear layer (slower than base);
* merging the adapter into a copy of the weights removes that cost entirely;
* bfloat16 halves the bytes read, int8 weight-only quarters them, int4 eighths them,
  with held-out reply perplexity close to float32; which of them is fastest depends on
  the CPU, so :mod:`bot.kernels` measures them once per CPU and caches the choice
  (``mode="auto"``, the default). Dynamic int8 quantization of activations (torch.ao
  ``quantize_dynamic``) was also tried: fast, but it ruined perplexity, so it is not offered.

Greedy replies of Llama-style engines then run through :class:`bot.decode.LeanDecoder`
(fused q/k/v and gate/up matmuls, a pre-allocated KV cache, no ``generate()`` machinery
per token); sampling, other options and other architectures use ``generate()``.
``BOT_DECODE=generate`` forces ``generate()`` everywhere (to compare, or to rule it out).

An "engine" is a plain (peft-free) model holding base + one merged adapter in the
chosen precision. Engines are built on first use and kept in a small LRU cache, so
the backbone's own fp32 weights (used for training and classification) are never
modified.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch
from torch import nn

from .kernels import KINDS, QUANTIZED, convert

MODES = (*KINDS, "auto")
DEFAULT_MODE = "auto"
# generate() options the lean decode loop implements; any other one keeps generate()
LEAN_OPTIONS = {"max_new_tokens", "min_new_tokens", "do_sample", "pad_token_id", "eos_token_id",
                "repetition_penalty", "streamer"}
DECODE_ENV = "BOT_DECODE"


def decode_loop(model: nn.Module, options: dict | None = None) -> str:
    """``"lean"`` when bot.decode.LeanDecoder runs this engine's replies, else ``"generate"``."""
    from .decode import supports

    if os.environ.get(DECODE_ENV, "lean").strip().lower() in ("generate", "hf"):
        return "generate"
    if options is not None and (options.get("do_sample") or set(options) - LEAN_OPTIONS
                                or options.get("max_new_tokens") is None):
        return "generate"
    return "lean" if supports(model) else "generate"


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
    """A peft-free copy of the backbone with ``adapter`` merged, in kernel ``mode`` (bot.kernels)."""
    from .arch import model_from_weights

    if mode not in KINDS:
        raise ValueError(f"unknown fast mode '{mode}'; choose one of {MODES}")
    model = model_from_weights(backbone, merged_state_dict(backbone, adapter))
    model.requires_grad_(False)
    device = backbone.device
    if mode in QUANTIZED and device.type == "cuda":
        mode = "bf16"  # torch's int8/int4 weight-only kernels here are CPU kernels
    convert(model, mode)
    model.to(device)
    model.generation_config = backbone.base.generation_config
    return model


class EngineLRU:
    """Engines keyed by ``(adapter, variant)``, built once under ``lock``; the most recent kept.

    Shared by the PyTorch fast path and the llama.cpp engine: an engine is costly to build
    (a merged, converted copy of the weights) and worth keeping while its adapter is in use.
    """

    def __init__(self, lock):
        self.lock = lock
        self.items: OrderedDict[tuple, object] = OrderedDict()

    def get(self, key: tuple, build, size: int):
        """The engine under ``key`` (``build()`` makes it on a miss); keeps at most ``size``."""
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            engine = self.items[key] = build()
            while len(self.items) > size:
                self.items.popitem(last=False)
            return engine

    def __getitem__(self, key: tuple):
        return self.items[key]

    def drop(self, adapter: str | None) -> None:
        """Forget every engine built from ``adapter``."""
        with self.lock:
            for key in [k for k in self.items if k[0] == adapter]:
                del self.items[key]


class FastGenerator:
    """Generate on one adapter through a cached merged/quantized engine.

    Args:
        backbone: the Backbone whose weights and adapters are used.
        mode: "auto" (default: the kernel bot.kernels.choose measured for this CPU) or one
            of bot.kernels.KINDS ("fp32" = merged only).
        max_engines: engines kept in memory (reports/bench.md gives the size of one).
    """

    def __init__(self, backbone, mode: str = DEFAULT_MODE, max_engines: int = 3):
        self.backbone = backbone
        self.mode = mode
        self.max_engines = max_engines
        self._lock = threading.RLock()
        self._engines = EngineLRU(self._lock)
        self._auto: str | None = None

    @property
    def kind(self) -> str:
        """The kernel engines are built with (``auto`` resolved through bot.kernels.choose)."""
        if self.mode != "auto":
            return self.mode
        if self._auto is None:
            from .kernels import choose

            self._auto = choose(self.backbone).kind
        return self._auto

    def engine(self, adapter: str | None) -> nn.Module:
        kind = self.kind
        return self._engines.get((adapter, kind), lambda: build_engine(self.backbone, adapter, kind),
                                 self.max_engines)

    def invalidate(self, adapter: str | None) -> None:
        """Forget engines built from ``adapter`` (it was reloaded, retrained or dropped)."""
        self._engines.drop(adapter)

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
            if decode_loop(model, kwargs) == "lean":
                return self._lean(model).generate(
                    input_ids, kwargs["max_new_tokens"], min_new_tokens=kwargs.get("min_new_tokens") or 0,
                    eos_token_id=kwargs.get("eos_token_id", model.generation_config.eos_token_id),
                    repetition_penalty=kwargs.get("repetition_penalty") or 1.0,
                    streamer=kwargs.get("streamer"))
            out = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        return out[:, input_ids.shape[1]:].cpu()

    @staticmethod
    def _lean(model: nn.Module):
        """The engine's LeanDecoder, built on first use (it fuses the engine's weights in place)."""
        from .decode import LeanDecoder

        decoder = getattr(model, "bot_lean_decoder", None)
        if decoder is None:
            decoder = LeanDecoder(model)
            model.bot_lean_decoder = decoder
        return decoder

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
