"""Cached frozen layers for classify training.

When an adapter's LoRA sits only on decoder layers k..end, layers 0..k-1 compute the
same states for the same text in every epoch. ``StateCache`` keeps the hidden states
entering layer k (one tensor per training text, unpadded), computed once with no grad
on the bare backbone; each training step then runs only layers k..end and the final
norm. The calls reuse transformers' own pieces (the decoder layers, the rotary module,
``create_causal_mask``), so the cached and uncached paths compute the same numbers.
Only architectures whose decoder-layer call is known (Llama) take this path; anything
else trains uncached, and ``plan`` says why.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bot import settings
from bot.util.assets import cache_dir

log = logging.getLogger(__name__)

# model types whose LlamaModel.forward this module reproduces (checked by the tests)
SUPPORTED_MODEL_TYPES = ("llama",)
ATTENTION = ("sdpa", "eager")
BUDGET_ENV = "BOT_TRAIN_CACHE_MB"
DEFAULT_BUDGET_MB = 1024
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def plan(backbone, adapter: str) -> tuple[int | None, str]:
    """Where caching may start for ``adapter``.

    Returns:
        (k, reason): k = the first decoder layer holding this adapter's LoRA, or None
        when the uncached path must be used; reason says why, in words for the log.
    """
    model = backbone.base
    cfg = model.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return None, (f"model type '{cfg.model_type}' is not one whose layers are known to match "
                      f"(only {list(SUPPORTED_MODEL_TYPES)})")
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "rotary_emb", "norm")):
        return None, "the model lacks the embed_tokens/layers/rotary_emb/norm layout of LlamaModel"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ATTENTION:
        return None, f"attention implementation '{impl}' is not one of {list(ATTENTION)}"
    if backbone.peft is None or adapter not in backbone.peft.peft_config:
        return None, f"adapter '{adapter}' is not loaded"
    layers = set()
    for name, module in backbone.peft.named_modules():
        if adapter in getattr(module, "lora_A", {}):
            found = _LAYER.search(name)
            if not found:
                return None, f"LoRA on '{name}' lies outside the decoder layers"
            layers.add(int(found.group(1)))
    if not layers:
        return None, f"adapter '{adapter}' has no LoRA modules"
    k = min(layers)
    if k == 0:
        return None, "LoRA starts at layer 0: no layer is frozen below it"
    return k, (f"LoRA starts at layer {k} of {cfg.num_hidden_layers}: layers 0-{k - 1} are frozen, "
               f"so their output is computed once per text and cached")


def budget_bytes() -> int:
    """Memory the cache may take before it moves to a memory-mapped file (``$BOT_TRAIN_CACHE_MB``)."""
    return int(float(settings.get(BUDGET_ENV, str(DEFAULT_BUDGET_MB))) * 2**20)


def _context(model, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """Positions, causal+padding mask and rotary embeddings, as LlamaModel.forward builds them."""
    from transformers.masking_utils import create_causal_mask  # lazy: transformers is heavy

    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=attention_mask,
                              cache=None, position_ids=positions)
    rotary = model.model.rotary_emb(hidden, position_ids=positions)
    return {"attention_mask": mask, "position_ids": positions, "position_embeddings": rotary}


def run_layers(model, hidden: torch.Tensor, attention_mask: torch.Tensor, layers) -> torch.Tensor:
    """Run ``hidden`` through ``layers`` (a slice of the decoder) with no KV cache."""
    ctx = _context(model, hidden, attention_mask)
    for layer in layers:
        hidden = layer(hidden, use_cache=False, **ctx)
    return hidden


class StateCache:
    """Hidden states entering layer k for every distinct training text, unpadded, in one flat tensor.

    Args:
        lengths: token count of each stored text (after truncation), in row order.
        hidden: the model's hidden size.
        dtype: the hidden states' dtype (the embedding dtype).
        label: a name for the memory-mapped file.
        index: training item id -> its row (items that share a text share a row);
            None = item ids are rows.
    """

    def __init__(self, lengths: list[int], hidden: int, dtype: torch.dtype, label: str = "states",
                 index: dict[int, int] | None = None):
        self.index = index
        self.lengths = torch.tensor(lengths, dtype=torch.long)
        self.offsets = torch.cumsum(self.lengths, 0) - self.lengths
        total = int(self.lengths.sum())
        self.nbytes = total * hidden * torch.empty((), dtype=dtype).element_size()
        self.path: Path | None = None
        if self.nbytes <= budget_bytes():
            self.store = torch.empty((total, hidden), dtype=dtype)
        else:
            # too big for the budget: a file the OS pages in and out (deleted by close())
            folder = cache_dir() / "train-states"
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / f"{label}-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
            self.store = torch.from_file(str(self.path), shared=True, size=total * hidden,
                                         dtype=dtype).view(total, hidden)
        self.filled = torch.zeros(len(lengths), dtype=torch.bool)

    @property
    def where(self) -> str:
        return f"memory-mapped file {self.path}" if self.path else "memory"

    def rows(self, items: list[int]) -> list[int]:
        """The rows holding training items ``items``."""
        return list(items) if self.index is None else [self.index[i] for i in items]

    def put(self, ids: list[int], states: torch.Tensor) -> None:
        """Store rows of a right-padded (batch, length, hidden) tensor under row ids."""
        for row, i in enumerate(ids):
            n, start = int(self.lengths[i]), int(self.offsets[i])
            self.store[start:start + n] = states[row, :n]
            self.filled[i] = True

    def batch(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(right-padded states, attention mask) for rows ``ids``; pads are zeros and masked."""
        lens = self.lengths[ids]
        width = int(lens.max())
        out = torch.zeros((len(ids), width, self.store.shape[1]), dtype=self.store.dtype)
        for row, i in enumerate(ids):
            n, start = int(self.lengths[i]), int(self.offsets[i])
            out[row, :n] = self.store[start:start + n]
        mask = (torch.arange(width).unsqueeze(0) < lens.unsqueeze(1)).long()
        return out, mask

    def close(self) -> None:
        """Free the states and delete the memory-mapped file, if any."""
        self.store = torch.empty(0)
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def build_cache(backbone, adapter: str, texts: list[str], lengths: list[int], k: int,
                batch_tokens: int, max_length: int, among=None, desc: str = "cache") -> StateCache:
    """Hidden states entering layer ``k`` for every distinct text among ``texts``.

    A text that several training items share (a headline repeated by ``view_repeats``) is
    computed and stored once; the cache's ``rows`` maps item ids to it. Texts run shortest
    first, as many per batch as fit in ``batch_tokens``, so batches pad little.

    Args:
        texts: each training item's prompt; lengths: its token count (after truncation).
        among: only these item ids (default: all).
    """
    first: dict[str, int] = {}  # text -> its row in the cache
    owner, index = [], {}       # row -> an item with that text; item -> row
    for i in range(len(texts)) if among is None else among:
        row = first.setdefault(texts[i], len(owner))
        if row == len(owner):
            owner.append(i)
        index[i] = row
    cache = StateCache([lengths[i] for i in owner], backbone.base.config.hidden_size,
                       backbone.base.model.embed_tokens.weight.dtype, label=adapter, index=index)
    order = sorted(range(len(owner)), key=lambda row: lengths[owner[row]])
    groups, start = [], 0
    while start < len(order):  # the longest text comes last in each group and sets its padding
        end = start + 1
        while end < len(order) and (end + 1 - start) * lengths[owner[order[end]]] <= batch_tokens:
            end += 1
        groups.append(order[start:end])
        start = end
    try:
        for rows in tqdm(groups, desc=desc, unit="batch"):
            enc = backbone.encode([texts[owner[r]] for r in rows], max_length)
            cache.put(rows, lower_states(backbone, adapter, enc, k))
    except BaseException:
        cache.close()
        raise
    return cache


def lower_states(backbone, adapter: str, enc: dict, k: int) -> torch.Tensor:
    """Hidden states entering layer ``k`` for a tokenized batch, on the bare backbone, no grad."""
    model = backbone.base
    with torch.no_grad(), backbone.lock:
        backbone.peft.set_adapter(adapter)  # disable_adapter() needs a live active adapter
        with backbone.peft.disable_adapter(), backbone.autocast():
            return _embed_and_run(model, enc, k)


def _embed_and_run(model, enc: dict, k: int) -> torch.Tensor:
    hidden = model.model.embed_tokens(enc["input_ids"])
    return run_layers(model, hidden, enc["attention_mask"], model.model.layers[:k])


def upper_states(backbone, hidden: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Layers ``k``..end and the final norm, with the active adapter (gradients flow)."""
    model = backbone.base
    with backbone.lock, backbone.autocast():
        hidden = run_layers(model, hidden, attention_mask, model.model.layers[k:])
        return model.model.norm(hidden)
