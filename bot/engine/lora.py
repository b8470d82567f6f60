"""Every generation adapter's LoRA, stacked per layer group, applied per token in one step.

For each decoder layer the lean step has four matmul groups: fused q/k/v, o, fused
gate/up and down. A :class:`LoraBank` holds, for one group, every adapter's ``A``
matrices stacked and stored transposed (``in x R``, R = the sum of the ranks) and their
``B`` matrices as one ``R x out`` block (each adapter's columns placed at its projection's
output rows). Per step, a column mask (tokens x R) carries each token's adapter scale on
its adapter's columns and zero elsewhere, so

    y += ((h @ A_t) * mask) @ B

adds the right LoRA to every token in two small matmuls, whatever mix of adapters
the step holds (punica's BGMV in dense form). A step whose tokens all use one adapter
skips the mask: ``y.addmm_(h @ A_t[:, cols], B[cols], alpha=scale)`` on views of that
adapter's columns kept per bank (no per-step slicing, no copy). ``y`` is always a float32
tensor (the q/k/v output after its cast, or the residual stream for o and down), so the
add is one fused ``addmm_``. A group none of the step's adapters touch costs nothing.
Ranks may differ between adapters.

A token may also carry a :class:`Mixture` of adapters (``chat:0.7+assistant:0.3``): its
mask row then holds each named adapter's columns at weight * scale, so the step adds
``sum_i w_i * scale_i * B_i A_i h``, the weighted sum of the adapters' LoRA deltas, in
the same two matmuls and the same batch as every other token (peft's
``add_weighted_adapter(combination_type="cat")`` builds the same delta offline).

The stacks are float32 copies of peft's matrices (one copy whatever the kernels): an
adapter costs its LoRA matrices twice (peft's and the stack), never a merged model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from bot.errors import AdapterError, MixtureError

# module leaf -> (group, which output part) in the lean step's fused layout
GROUPS = {"q_proj": (0, 0), "k_proj": (0, 1), "v_proj": (0, 2), "o_proj": (1, 0),
          "gate_proj": (2, 0), "up_proj": (2, 1), "down_proj": (3, 0)}
_LAYER = re.compile(r"\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


MIX_WEIGHT = 2.0  # |weight| of one adapter in a mixture at most


@dataclass(frozen=True)
class Mixture:
    """A weighted sum of generation adapters for one request: ``((name, weight), ...)``."""

    parts: tuple[tuple[str, float], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.parts)

    def __str__(self) -> str:
        return "+".join(f"{n}:{w:g}" for n, w in self.parts)

    @classmethod
    def parse(cls, text: str) -> Mixture:
        """``name:weight(+name:weight)*``; raises MixtureError (a ValueError) saying what does not parse."""
        parts = []
        for i, piece in enumerate(text.split("+")):
            name, sep, weight = piece.strip().partition(":")
            if not sep or not name:
                raise MixtureError(f"part {i + 1} ({piece[:40]!r}) is not NAME:WEIGHT")
            try:
                w = float(weight)
            except ValueError:
                raise MixtureError(f"the weight of '{name[:40]}' ({weight[:20]!r}) is not a "
                                 "number") from None
            if not (abs(w) <= MIX_WEIGHT):  # (also refuses nan)
                raise MixtureError(f"the weight of '{name[:40]}' is {weight[:20]}; weights must be "
                                 f"finite numbers in [-{MIX_WEIGHT:g}, {MIX_WEIGHT:g}]")
            parts.append((name, w))
        names = [n for n, _ in parts]
        if len(set(names)) != len(names):
            raise MixtureError("an adapter is named twice")
        return cls(tuple(parts))


def adapter_names(adapter) -> tuple[str, ...]:
    """The adapters a token's key uses: none (base), one name, or a mixture's."""
    if adapter is None:
        return ()
    return (adapter,) if isinstance(adapter, str) else adapter.names


@dataclass
class LoraBank:
    """One layer group's stacked adapters, float32."""

    out_features: int
    in_features: int
    cols: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # name -> (start, end, scale)
    a_t: torch.Tensor | None = None  # (in, R), float32: every adapter's A, transposed
    b: torch.Tensor | None = None  # (R, out), float32
    # name -> (A_t columns, B rows, scale): views of the stacks for single-adapter steps
    views: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)

    def layout(self) -> tuple:
        return tuple(sorted(self.cols.items()))

    def add(self, name: str, parts: list[tuple[int, torch.Tensor, torch.Tensor]], scale: float) -> None:
        """Stack adapter ``name``: ``parts`` = (output offset, A (r, in), B (out_part, r))."""
        r = sum(a.shape[0] for _, a, _ in parts)
        start = 0 if self.a_t is None else self.a_t.shape[1]
        a_new = torch.cat([a.float() for _, a, _ in parts])
        b_new = torch.zeros(r, self.out_features, device=a_new.device)
        col = 0
        for offset, a, b in parts:
            b_new[col:col + a.shape[0], offset:offset + b.shape[0]] = b.float().T
            col += a.shape[0]
        a_t = a_new.T if self.a_t is None else torch.cat([self.a_t, a_new.T], dim=1)
        self.a_t = a_t.contiguous()
        self.b = b_new if self.b is None else torch.cat([self.b, b_new])
        self.cols[name] = (start, start + r, scale)
        self._views()

    def remove(self, name: str) -> None:
        start, end, _ = self.cols.pop(name)
        keep = torch.cat([torch.arange(0, start), torch.arange(end, self.b.shape[0])]).to(self.b.device)
        self.a_t, self.b = self.a_t[:, keep].contiguous(), self.b[keep]
        self.cols = {n: (s - (end - start) if s >= end else s, e - (end - start) if s >= end else e, c)
                     for n, (s, e, c) in self.cols.items()}
        if not self.cols:
            self.a_t = self.b = None
        self._views()

    def _views(self) -> None:
        self.views = {n: (self.a_t[:, s:e], self.b[s:e], c) for n, (s, e, c) in self.cols.items()}

    def nbytes(self) -> int:
        return 0 if self.a_t is None else (self.a_t.numel() + self.b.numel()) * 4


class BankSet:
    """The banks of every layer group, built from the backbone's peft adapters.

    Args:
        sizes: per group, (out_features, in_features, output offsets of its parts).
        n_layers: decoder layers.
        device: where the step runs.
    """

    def __init__(self, sizes: list[tuple[int, int, list[int]]], n_layers: int, device):
        self.sizes = sizes
        self.device = device
        self.banks: list[list[LoraBank | None]] = [[None] * len(sizes) for _ in range(n_layers)]
        self.adapters: dict[str, int] = {}  # name -> bytes of its float32 LoRA matrices
        # adapter -> its per-layer arguments for the compiled loop (bot.engine.native.lora_args)
        self.native_cache: dict[str, tuple] = {}

    def add_adapter(self, backbone, name: str) -> int:
        """Stack adapter ``name`` (loaded on ``backbone``'s peft model); returns its bytes.

        Raises:
            AdapterError: it is not loaded, or adapts a module the lean step does not cover.
        """
        from peft.tuners.lora import LoraLayer  # lazy: peft is heavy

        peft = backbone.peft
        if peft is None or name not in peft.peft_config:
            raise AdapterError(f"generation adapter '{name}' is not loaded on the backbone")
        found: dict[tuple[int, int], list] = {}
        scales: dict[tuple[int, int], float] = {}
        nbytes = 0
        with backbone.lock:
            for path, module in backbone.base.named_modules():
                if not isinstance(module, LoraLayer) or name not in module.lora_A:
                    continue
                m = _LAYER.search(path)
                if m is None or m.group(2) not in GROUPS:
                    raise AdapterError(f"adapter '{name}' adapts {path}, which the lean engine "
                                       "does not cover. Fix: train it on the attention/MLP "
                                       "projections (q/k/v/o/gate/up/down_proj)")
                if getattr(module, "use_dora", {}).get(name):
                    raise AdapterError(f"adapter '{name}' uses DoRA, which the engine does not "
                                       "apply. Fix: retrain it with plain LoRA")
                group, part = GROUPS[m.group(2)]
                key = (int(m.group(1)), group)
                a = module.lora_A[name].weight.detach()
                b = module.lora_B[name].weight.detach()
                scale = float(module.scaling[name])
                if key in scales and scales[key] != scale:
                    # one scale per (adapter, group): fold a differing one into B
                    b = b * (scale / scales[key])
                scales.setdefault(key, scale)
                found.setdefault(key, []).append((self.sizes[group][2][part], a, b))
                nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
        if not found:
            raise AdapterError(f"adapter '{name}' has no LoRA layers on this backbone")
        for (layer, group), parts in found.items():
            bank = self.banks[layer][group]
            if bank is None:
                out, inp, _ = self.sizes[group]
                bank = self.banks[layer][group] = LoraBank(out, inp)
            bank.add(name, [(o, a.to(self.device), b.to(self.device)) for o, a, b in parts],
                     scales[(layer, group)])
        self.adapters[name] = nbytes
        self.native_cache.clear()
        return nbytes

    def remove_adapter(self, name: str) -> None:
        self.native_cache.clear()
        for row in self.banks:
            for gi, bank in enumerate(row):
                if bank is not None and name in bank.cols:
                    bank.remove(name)
                    if not bank.cols:
                        row[gi] = None
        self.adapters.pop(name, None)

    def nbytes(self) -> int:
        return sum(b.nbytes() for row in self.banks for b in row if b is not None)

    def widest_stack(self) -> int:
        """The most LoRA columns any layer group stacks (0 without adapters)."""
        return max((b.b.shape[0] for row in self.banks for b in row if b is not None), default=0)

    def plan(self, token_adapters: list[str | None]) -> LoraPlan | None:
        """What one step adds: None when no token uses a served adapter."""
        used = {a for a in token_adapters
                if a is not None and all(n in self.adapters for n in adapter_names(a))}
        if not used:
            return None
        return LoraPlan(self, token_adapters, used)


class LoraPlan:
    """The per-token masks of one step (one per distinct bank layout)."""

    def __init__(self, banks: BankSet, token_adapters: list[str | None], used: set[str]):
        self.banks = banks
        self.n = len(token_adapters)
        one = next(iter(used)) if len(used) == 1 and None not in token_adapters else None
        self.only = one if isinstance(one, str) else None  # a lone mixture still needs its mask
        self.rows: dict[str, torch.Tensor] = {}
        if self.only is None:
            for name in used:
                self.rows[name] = torch.tensor([i for i, a in enumerate(token_adapters) if a == name],
                                               device=banks.device)
        self._masks: dict[tuple, torch.Tensor | None] = {}

    def _mask(self, bank: LoraBank) -> torch.Tensor | None:
        key = bank.layout()
        if key not in self._masks:
            mask = None
            for who, rows in self.rows.items():  # an adapter name or a Mixture
                parts = ((who, 1.0),) if isinstance(who, str) else who.parts
                for name, weight in parts:
                    if name in bank.cols:
                        start, end, scale = bank.cols[name]
                        if mask is None:
                            mask = torch.zeros(self.n, bank.b.shape[0], device=self.banks.device)
                        mask[rows, start:end] = weight * scale
            self._masks[key] = mask
        return self._masks[key]

    def touches(self, layer: int, group: int) -> bool:
        """Whether some token of the step has LoRA on this group of ``layer``."""
        bank = self.banks.banks[layer][group]
        if bank is None:
            return False
        if self.only is not None:
            return self.only in bank.cols
        return any(name in bank.cols for key in self.rows for name in adapter_names(key))

    def native_part(self, layer: int, group: int):
        """What :meth:`add` applies, as (A_t, B, row mask or None, scale); None: nothing."""
        bank = self.banks.banks[layer][group]
        if bank is None:
            return None
        if self.only is not None:
            view = bank.views.get(self.only)
            return None if view is None else (*view[:2], None, view[2])
        mask = self._mask(bank)
        return None if mask is None else (bank.a_t, bank.b, mask, 1.0)

    def add(self, layer: int, group: int, h: torch.Tensor, y: torch.Tensor) -> None:
        """``y += LoRA(h)`` in place for every token of the step (group of ``layer``).

        ``h`` and ``y`` are float32: the rank-r products run in float32 whatever the step's
        kernel (bf16 matmuls this small cost 60-150 us each in oneDNN against 12-22 us in
        float32, 2-core AVX512-BF16), and the add is one ``addmm_``.
        """
        bank = self.banks.banks[layer][group]
        if bank is None:
            return
        if self.only is not None:
            view = bank.views.get(self.only)
            if view is None:
                return
            a_t, b, scale = view
            y.addmm_(h @ a_t, b, alpha=scale)
            return
        mask = self._mask(bank)
        if mask is not None:
            y.addmm_((h @ bank.a_t).mul_(mask), bank.b)
