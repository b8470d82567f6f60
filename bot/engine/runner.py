"""Runners: what executes one engine step. The lean step where it applies, else transformers.

Both take the same ragged list of :class:`bot.engine.lean.Segment` and return one row of
float32 logits per segment whose next token is wanted.

* :class:`LeanRunner` (Llama-style families, bot.engine.lean.SUPPORTED): fused weights in
  two kernels (``small`` for steps of at most ``threshold`` tokens, ``large`` above;
  bot.engine.tuning chooses them), a float32 key/value cache of one row per request,
  every adapter's LoRA stacked per layer group (bot.engine.lora). Prompts are
  prefilled in chunks beside the decoding rows.
* :class:`HFRunner` (any other causal LM): transformers' forward over a plain copy of the
  model whose linear layers apply each row's LoRA (bot.engine.hf), a per-row cache
  (bot.engine.slotcache), whole prompts prefilled in the step that admits them.
"""

from __future__ import annotations

import logging

import torch

from bot.engine import native
from bot.engine.hf import LoraEngine
from bot.engine.lean import LeanModel, Segment, Weights, supports, why_not
from bot.engine.lora import BankSet
from bot.engine.plain import plain_model
from bot.engine.precision import for_device
from bot.engine.prefix import PrefixCache
from bot.engine.slotcache import SlotCache, decode_mask, prefill_mask
from bot.engine.tuning import resolve

log = logging.getLogger(__name__)


def make_runner(backbone, precision: str, max_rows: int, max_len: int):
    """The runner for ``backbone``: lean where the family is covered, else transformers'."""
    choice = resolve(backbone, precision)
    if supports(backbone.base):
        return LeanRunner(backbone, choice, max_rows, max_len)
    log.info("engine: transformers forward (%s)", why_not(backbone.base))
    return HFRunner(backbone, choice.large, max_rows, max_len)


class LeanRunner:
    """The lean step over two kernels' weights (see the module docstring)."""

    name = "lean"
    chunked = True

    def __init__(self, backbone, choice, max_rows: int, max_len: int):
        self.backbone = backbone
        dev = backbone.device
        self.small, self.large = for_device(choice.small, dev), for_device(choice.large, dev)
        self.threshold = choice.threshold
        self.precision = self.small if self.small == self.large else f"{self.small},{self.large}"
        self.choice = choice
        model = plain_model(backbone)
        self.lean = LeanModel(model, max_len)
        self.weights = {k: Weights(model, k) for k in dict.fromkeys((self.small, self.large))}
        del model  # the weights hold what they need (fp32 ones share the backbone's tensors)
        self.cache = self.lean.new_cache(max_rows, max_len)
        if self.lean.native_ok:
            native.module()  # built (once per machine) or loaded now, not in the first reply
        lm = self.lean
        hidden = lm.embed.shape[1]
        sizes = [(lm.q_size + 2 * lm.kv_size, hidden, [0, lm.q_size, lm.q_size + lm.kv_size]),
                 (hidden, lm.q_size, [0]), (2 * lm.inter, hidden, [0, lm.inter]),
                 (hidden, lm.inter, [0])]
        self.banks = BankSet(sizes, lm.n_layers, dev)
        self.prefixes = PrefixCache(self)

    @property
    def adapters(self) -> dict[str, int]:
        return self.banks.adapters

    def describe(self) -> str:
        if self.small == self.large:
            return f"lean step, {self.small}"
        return f"lean step, {self.small} up to {self.threshold} tokens per step, {self.large} above"

    def kind_for(self, tokens: int) -> str:
        return self.small if tokens <= self.threshold else self.large

    def step(self, segments: list[Segment]) -> torch.Tensor:
        n = sum(len(s.ids) for s in segments)
        return self.lean.step(segments, self.weights[self.kind_for(n)], self.cache, self.banks)

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)

    def save_prefix(self, slot: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of row ``slot``'s first ``length`` keys and values, per layer (bot.engine.prefix)."""
        return [(k[slot, :, :length].clone(), v[slot, :, :length].clone())
                for k, v in zip(self.cache.k, self.cache.v)]

    def load_prefix(self, saved, slot: int, length: int) -> None:
        self.cache.ensure(length)
        for (k, v), kc, vc in zip(saved, self.cache.k, self.cache.v):
            kc[slot, :, :length] = k
            vc[slot, :, :length] = v

    def add_adapter(self, name: str) -> int:
        self.prefixes.clear()  # a re-added name may carry other weights
        return self.banks.add_adapter(self.backbone, name)

    def remove_adapter(self, name: str) -> None:
        self.prefixes.clear()
        self.banks.remove_adapter(name)

    @torch.inference_mode()
    def sequence_logits(self, enc: dict, adapters: list[str | None], kind: str | None = None) -> torch.Tensor:
        """Logits at every position of right-padded rows (scoring held-out text), float32."""
        ids, mask = enc["input_ids"], enc["attention_mask"]
        rows, width = ids.shape
        kind = kind or self.large
        if kind not in self.weights:  # another kernel, to score it (kept while the runner lives)
            self.weights[kind] = Weights(plain_model(self.backbone), kind)
        weights = self.weights[kind]
        cache = self.lean.new_cache(rows, width)
        out = torch.zeros(rows, width, self.lean.vocab)
        for i in range(rows):
            n = int(mask[i].sum())
            seg = Segment(i, 0, ids[i, :n].tolist(), adapters[i])
            out[i, :n] = self.lean.step([seg], weights, cache, self.banks, every=True)
        return out


class HFRunner:
    """transformers' forward with per-row LoRA (families the lean step does not cover)."""

    name = "transformers"
    chunked = False

    def __init__(self, backbone, kind: str, max_rows: int, max_len: int):
        self.engine = LoraEngine(backbone, for_device(kind, backbone.device))
        self.precision = self.engine.precision
        self.cache = SlotCache(max_rows, max_len)

    @property
    def adapters(self) -> dict[str, int]:
        return self.engine.adapters

    def describe(self) -> str:
        return f"transformers forward, {self.precision}"

    def add_adapter(self, name: str) -> int:
        return self.engine.add_adapter(name)

    def remove_adapter(self, name: str) -> None:
        self.engine.remove_adapter(name)

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move_row(src, dst, length)

    def sequence_logits(self, enc: dict, adapters: list[str | None], kind=None) -> torch.Tensor:
        """Logits at every position (``kind`` is ignored: this runner holds one kernel)."""
        return self.engine.sequence_logits(enc, adapters)

    def step(self, segments: list[Segment]) -> torch.Tensor:
        """Decode rows (slots 0..d-1) first, then whole prompts in the rows after them."""
        dec = sorted((s for s in segments if s.pos > 0), key=lambda s: s.slot)
        pre = sorted((s for s in segments if s.pos == 0), key=lambda s: s.slot)
        rows: dict[int, torch.Tensor] = {}
        if dec:
            if [s.slot for s in dec] != list(range(len(dec))):
                raise RuntimeError("transformers runner: decoding rows must be rows 0..n-1")
            lengths = [s.pos for s in dec]
            self.cache.plan_decode(lengths)
            ids = torch.tensor([s.ids for s in dec])
            logits = self.engine.forward(ids, torch.tensor(lengths)[:, None], decode_mask(lengths),
                                         self.cache, [s.adapter for s in dec])
            rows.update({id(s): row for s, row in zip(dec, logits)})
        if pre:
            first = pre[0].slot
            if [s.slot for s in pre] != list(range(first, first + len(pre))):
                raise RuntimeError("transformers runner: new prompts must take consecutive rows")
            lengths = [len(s.ids) for s in pre]
            width = max(lengths)
            pad = torch.zeros(len(pre), width, dtype=torch.long)
            for i, s in enumerate(pre):
                pad[i, :lengths[i]] = torch.tensor(s.ids)
            self.cache.plan_prefill(first, width)
            logits = self.engine.forward(pad, torch.arange(width).expand(len(pre), width),
                                         prefill_mask(lengths), self.cache,
                                         [s.adapter for s in pre], torch.tensor(lengths) - 1)
            rows.update({id(s): row for s, row in zip(pre, logits)})
        wanted = [rows[id(s)] for s in segments if s.want]
        return torch.stack(wanted) if wanted else torch.empty(0)
