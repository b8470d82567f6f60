"""The transformers fallback runner's model: a copy of the backbone that applies many LoRA adapters unmerged, per row.

Why not peft's mixed ``adapter_names=`` batches? They work, but they live on the
backbone's own model (which training and the classifiers share behind one lock) and
cannot run the base weights in another precision. The serving engine is a second
model object whose base weights are *shared* with the backbone in float32 (no copy)
or converted once to bfloat16 / int8 weight-only (the fast path's kernels). Each
adapted linear layer becomes a :class:`MultiLoraLinear` holding every adapter's
``A``/``B`` matrices; before each forward pass the scheduler says which rows use
which adapter, and each layer adds ``scale * B(A(x))`` for those rows only
(the idea behind Punica's SGMV and S-LoRA, done here with plain matmuls).

An extra generation adapter therefore costs only its LoRA matrices: no merged copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bot.engine.plain import plain_state
from bot.engine.precision import KINDS as PRECISIONS
from bot.engine.precision import activation_dtype, convert, for_device
from bot.errors import AdapterError, BackboneError
from bot.model.families import model_from_weights


@dataclass
class RowGroups:
    """Which rows of the current batch use which adapter (None = the bare backbone).

    ``groups`` maps an adapter name to the row indices using it; ``all_rows`` is the
    one adapter every row uses, when they all agree (the common single-adapter case,
    where indexing can be skipped).
    """

    groups: dict[str, torch.Tensor]
    all_rows: str | None = None

    @classmethod
    def from_names(cls, names: list[str | None], device=None) -> RowGroups:
        distinct = set(names)
        if len(distinct) == 1:
            only = next(iter(distinct))
            return cls({}, only)
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            if name is not None:
                groups.setdefault(name, []).append(i)
        return cls({k: torch.tensor(v, device=device) for k, v in groups.items()})


class MultiLoraLinear(nn.Module):
    """A frozen base layer plus any number of unmerged LoRA adapters, chosen per row.

    Args:
        base: the base layer (``nn.Linear``, GPT-2's ``Conv1D`` or an int8 layer).
        router: the engine's shared :class:`_Routing` object (set per forward pass).
    """

    def __init__(self, base: nn.Module, router: _Routing):
        super().__init__()
        self.base = base
        self.router = router
        self.loras: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.router.current
        if rows is None or not self.loras:
            return y
        if rows.all_rows is not None:
            lora = self.loras.get(rows.all_rows)
            if lora is not None:
                a, b, scale = lora
                y = y + (x.to(a.dtype) @ a.T @ b.T * scale).to(y.dtype)
            return y
        for name, idx in rows.groups.items():
            lora = self.loras.get(name)
            if lora is None:
                continue
            a, b, scale = lora
            delta = (x[idx].to(a.dtype) @ a.T @ b.T * scale).to(y.dtype)
            y = y.index_add(0, idx, delta)
        return y


class _Routing:
    """Mutable holder for the current batch's RowGroups, shared by every layer."""

    current: RowGroups | None = None


class LoraEngine:
    """The serving model: base weights in one precision + every generation adapter.

    Args:
        backbone: a loaded Backbone (its adapters are read from its peft model).
        precision: a kernel of bot.engine.precision.KINDS: "fp32" shares the backbone's weights
            (no copy; exact); the others convert a copy once.
    """

    def __init__(self, backbone, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision '{precision}'; choose one of {PRECISIONS}")
        if backbone.quantized:
            raise BackboneError(f"the serving engine cannot run a {backbone.load_in} (bitsandbytes) "
                                "backbone: it rebuilds the model from plain weights. Fix: load the "
                                "backbone with --load-in bf16 (or fp32) to chat or serve")
        precision = for_device(precision, backbone.device)
        self.backbone = backbone
        self.precision = precision
        with backbone.lock:
            # the engine's parameters are the backbone's own tensors (assigned, not copied)
            model = model_from_weights(backbone, plain_state(backbone))
        model.eval()
        model.requires_grad_(False)
        convert(model, precision)  # quantized kinds replace the shared linears by converted copies
        self.model = model
        self.dtype = activation_dtype(precision)
        self.routing = _Routing()
        self.wrapped: dict[str, MultiLoraLinear] = {}
        self.adapters: dict[str, int] = {}  # name -> bytes held

    # ----------------------------------------------------------- adapters
    def add_adapter(self, name: str) -> int:
        """Serve adapter ``name``: its LoRA matrices are shared with the backbone.

        Returns the bytes of those matrices.
        """
        from peft.tuners.lora import LoraLayer  # lazy: peft is heavy

        peft = self.backbone.peft
        if peft is None or name not in peft.peft_config:
            raise AdapterError(f"generation adapter '{name}' is not loaded on the backbone")
        nbytes = 0
        found = {}
        with self.backbone.lock:
            for path, module in self.backbone.base.named_modules():
                if not isinstance(module, LoraLayer) or name not in module.lora_A:
                    continue
                # the backbone's own float32 tensors, never a copy: an adapter costs its LoRA
                # matrices once, whatever the engine's precision (the rank-r matmuls are tiny)
                a = module.lora_A[name].weight.detach()
                b = module.lora_B[name].weight.detach()
                found[path] = (a, b, float(module.scaling[name]))
                nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
        for path, lora in found.items():
            self._wrap(path).loras[name] = lora
        self.adapters[name] = nbytes
        return nbytes

    def remove_adapter(self, name: str) -> None:
        for layer in self.wrapped.values():
            layer.loras.pop(name, None)
        self.adapters.pop(name, None)

    def _wrap(self, path: str) -> MultiLoraLinear:
        if path in self.wrapped:
            return self.wrapped[path]
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        layer = MultiLoraLinear(getattr(parent, child), self.routing)
        setattr(parent, child, layer)
        self.wrapped[path] = layer
        return layer

    # ------------------------------------------------------------ forward
    @torch.inference_mode()
    def sequence_logits(self, enc: dict, adapters: list[str | None]) -> torch.Tensor:
        """Logits at every position of right-padded rows (scoring held-out text)."""
        self.routing.current = RowGroups.from_names(adapters)
        try:
            return self.model(input_ids=enc["input_ids"],
                              attention_mask=enc["attention_mask"]).logits.float()
        finally:
            self.routing.current = None

    @torch.inference_mode()
    def forward(self, input_ids, position_ids, attention_mask, cache, adapters: list[str | None],
                logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """One forward pass; returns the logits at ``logits_rows`` (one position per row).

        Args:
            attention_mask: a 4D boolean mask (rows, 1, queries, keys), True = attend.
            adapters: the adapter of each row (None = the bare backbone).
            logits_rows: per row, the query position whose logits are wanted
                (default: the last one).
        """
        dev = self.device
        self.routing.current = RowGroups.from_names(adapters, dev)
        try:
            out = self.model.base_model(input_ids=input_ids.to(dev), position_ids=position_ids.to(dev),
                                        attention_mask=attention_mask.to(dev), cache=cache,
                                        use_cache=True)
        finally:
            self.routing.current = None
        hidden = out.last_hidden_state
        if logits_rows is None:
            last = hidden[:, -1]
        else:
            last = hidden[torch.arange(hidden.shape[0], device=dev), logits_rows.to(dev)]
        head = self.model.get_output_embeddings()
        return head(last).float().cpu()  # sampling (per-request CPU generators) runs on the CPU

    @property
    def device(self) -> torch.device:
        return self.backbone.device
