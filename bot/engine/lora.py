"""Every generation adapter's LoRA, stacked per layer group, applied per token in one step.

For each decoder layer the lean step has four matmul groups: fused q/k/v, o, fused
gate/up and down. A :class:`LoraBank` holds, for one group, every adapter's ``A``
matrices stacked as rows (``R x in``, R = the sum of the ranks) and their ``B``
matrices as one ``R x out`` block (each adapter's columns placed at its projection's
output rows). Per step, a column mask (tokens x R) carries each token's adapter scale on
its adapter's columns and zero elsewhere, so

    y += ((h @ A.T) * mask) @ B

adds the right LoRA to every token in two small matmuls, whatever mix of adapters
the step holds (punica's BGMV in dense form). A step whose tokens all use one adapter
skips the mask (one scaled ``addmm`` on that adapter's columns), and a group none of
the step's adapters touch costs nothing. Ranks may differ between adapters.

The stacks are float32 copies of peft's matrices (one copy whatever the kernels): an
adapter costs its LoRA matrices twice (peft's and the stack), never a merged model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import AdapterError

# module leaf -> (group, which output part) in the lean step's fused layout
GROUPS = {"q_proj": (0, 0), "k_proj": (0, 1), "v_proj": (0, 2), "o_proj": (1, 0),
          "gate_proj": (2, 0), "up_proj": (2, 1), "down_proj": (3, 0)}
_LAYER = re.compile(r"\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


@dataclass
class LoraBank:
    """One layer group's stacked adapters, float32."""

    out_features: int
    in_features: int
    cols: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # name -> (start, end, scale)
    a: torch.Tensor | None = None  # (R, in), float32
    b: torch.Tensor | None = None  # (R, out), float32

    def layout(self) -> tuple:
        return tuple(sorted(self.cols.items()))

    def add(self, name: str, parts: list[tuple[int, torch.Tensor, torch.Tensor]], scale: float) -> None:
        """Stack adapter ``name``: ``parts`` = (output offset, A (r, in), B (out_part, r))."""
        r = sum(a.shape[0] for _, a, _ in parts)
        start = 0 if self.a is None else self.a.shape[0]
        a_new = torch.cat([a.float() for _, a, _ in parts])
        b_new = torch.zeros(r, self.out_features, device=a_new.device)
        col = 0
        for offset, a, b in parts:
            b_new[col:col + a.shape[0], offset:offset + b.shape[0]] = b.float().T
            col += a.shape[0]
        self.a = a_new if self.a is None else torch.cat([self.a, a_new])
        self.b = b_new if self.b is None else torch.cat([self.b, b_new])
        self.cols[name] = (start, start + r, scale)

    def remove(self, name: str) -> None:
        start, end, _ = self.cols.pop(name)
        keep = torch.cat([torch.arange(0, start), torch.arange(end, self.a.shape[0])]).to(self.a.device)
        self.a, self.b = self.a[keep], self.b[keep]
        self.cols = {n: (s - (end - start) if s >= end else s, e - (end - start) if s >= end else e, c)
                     for n, (s, e, c) in self.cols.items()}
        if not self.cols:
            self.a = self.b = None

    def nbytes(self) -> int:
        return 0 if self.a is None else (self.a.numel() + self.b.numel()) * 4


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

    def add_adapter(self, backbone, name: str) -> int:
        """Stack adapter ``name`` (loaded on ``backbone``'s peft model); returns its bytes.

        Raises:
            AdapterError: it is not loaded, or adapts a module the lean step does not cover.
        """
        from peft.tuners.lora import LoraLayer

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
        return nbytes

    def remove_adapter(self, name: str) -> None:
        for row in self.banks:
            for gi, bank in enumerate(row):
                if bank is not None and name in bank.cols:
                    bank.remove(name)
                    if not bank.cols:
                        row[gi] = None
        self.adapters.pop(name, None)

    def nbytes(self) -> int:
        return sum(b.nbytes() for row in self.banks for b in row if b is not None)

    def plan(self, token_adapters: list[str | None]) -> LoraPlan | None:
        """What one step adds: None when no token uses a served adapter."""
        used = {a for a in token_adapters if a is not None and a in self.adapters}
        if not used:
            return None
        return LoraPlan(self, token_adapters, used)


class LoraPlan:
    """The per-token masks of one step (one per distinct bank layout)."""

    def __init__(self, banks: BankSet, token_adapters: list[str | None], used: set[str]):
        self.banks = banks
        self.n = len(token_adapters)
        self.only = next(iter(used)) if len(used) == 1 and None not in token_adapters else None
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
            for name, rows in self.rows.items():
                if name in bank.cols:
                    start, end, scale = bank.cols[name]
                    if mask is None:
                        mask = torch.zeros(self.n, bank.a.shape[0], device=self.banks.device)
                    mask[rows, start:end] = scale
            self._masks[key] = mask
        return self._masks[key]

    def add(self, layer: int, group: int, h: torch.Tensor, y: torch.Tensor) -> None:
        """``y += LoRA(h)`` in place for every token of the step (group of ``layer``).

        The rank-r products run in float32 whatever the step's kernel: bf16 matmuls this
        small cost 60-150 us each in oneDNN against 12-22 us in float32 (2-core AVX512-BF16).
        """
        bank = self.banks.banks[layer][group]
        if bank is None:
            return
        hf = h if h.dtype == torch.float32 else h.float()
        if self.only is not None:
            cols = bank.cols.get(self.only)
            if cols is None:
                return
            start, end, scale = cols
            t, b = hf @ bank.a[start:end].T, bank.b[start:end]
        else:
            mask = self._mask(bank)
            if mask is None:
                return
            t, b, scale = (hf @ bank.a.T).mul_(mask), bank.b, 1.0
        if y.dtype == torch.float32:
            y.addmm_(t, b, alpha=scale)
        else:
            y.add_(t @ b, alpha=scale)
