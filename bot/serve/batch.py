"""The rows decoding together: prefill, one decode step, sampling, streaming, removal."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cache import SlotCache, decode_mask, prefill_mask
from .sampling import SamplingParams, next_token

_ids = itertools.count(1)


@dataclass
class Event:
    """What a request's sink receives: text deltas, then one final event."""

    delta: str = ""
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    sink: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    length: int = 0  # tokens whose keys are in the cache
    emitted: int = 0  # characters of the decoded reply already sent
    first_token_at: float | None = None
    finished: bool = False
    cancelled: bool = False
    gen: torch.Generator | None = None

    def cancel(self) -> None:
        """Free this request's row at the next step (e.g. its client disconnected)."""
        self.cancelled = True


class DecodeBatch:
    """Live requests, row ``i`` of the cache belonging to ``active[i]``.

    Args:
        engine: the LoraEngine running the forward passes.
        cache: the SlotCache holding every row's keys and values.
        tokenizer: decodes the streamed text.
        eos: token ids that end a reply.
        max_len: the context limit per request.
    """

    def __init__(self, engine, cache: SlotCache, tokenizer, eos: set[int], max_len: int):
        self.engine, self.cache, self.tokenizer = engine, cache, tokenizer
        self.eos, self.max_len = eos, max_len
        self.active: list[Request] = []
        self.steps = 0
        self.metrics = None
        self.on_admitted: Callable[[], None] | None = None

    def prefill(self, fresh: list[Request]) -> None:
        first = len(self.active)
        lengths = [len(r.prompt_ids) for r in fresh]
        width = max(lengths)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(fresh), width), pad, dtype=torch.long)
        for i, r in enumerate(fresh):
            ids[i, :lengths[i]] = torch.tensor(r.prompt_ids)
        self.cache.plan_prefill(first, width)
        logits = self.engine.forward(ids, torch.arange(width).expand(len(fresh), width),
                                     prefill_mask(lengths), self.cache,
                                     [r.adapter for r in fresh], torch.tensor(lengths) - 1)
        now = time.perf_counter()
        self.active.extend(fresh)
        if self.on_admitted:
            self.on_admitted()
        for r, row, n in zip(fresh, logits, lengths):
            r.length = n
            r.first_token_at = now
            if self.metrics:
                self.metrics.first_token(r, now - r.created)
            self._accept(r, row)
        self.drop([r for r in fresh if r.finished])

    def decode(self) -> None:
        live = self.active
        lengths = [r.length for r in live]
        self.cache.plan_decode(lengths)
        ids = torch.tensor([[r.tokens[-1]] for r in live])
        logits = self.engine.forward(ids, torch.tensor(lengths)[:, None], decode_mask(lengths),
                                     self.cache, [r.adapter for r in live])
        self.steps += 1
        if self.metrics:
            self.metrics.step(len(live))
        for r, row in zip(live, logits):
            r.length += 1
            self._accept(r, row)
        self.drop([r for r in live if r.finished])

    def _accept(self, r: Request, logits: torch.Tensor) -> None:
        """Sample the next token for ``r``, stream its text, decide whether it is done."""
        seen = torch.tensor(r.prompt_ids + r.tokens) if r.params.repetition_penalty != 1.0 else \
            torch.empty(0, dtype=torch.long)
        tok = next_token(logits, r.params, seen, r.gen)
        if tok in self.eos:
            self.finish(r, "stop")
            return
        r.tokens.append(tok)
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        for stop in r.params.stop:
            cut = text.find(stop)
            if cut >= 0:
                self._emit(r, text[:cut])
                self.finish(r, "stop")
                return
        if len(r.tokens) >= r.params.max_tokens or r.length + 1 >= self.max_len:
            self._emit(r, text)
            self.finish(r, "length")
            return
        # hold back a possible beginning of a stop string, and half a UTF-8 character
        hold = max((len(s) - 1 for s in r.params.stop), default=0)
        safe = text[:len(text) - hold] if hold else text
        if not safe.endswith("\ufffd"):
            self._emit(r, safe)

    def _emit(self, r: Request, text: str) -> None:
        if len(text) > r.emitted:
            r.sink(Event(delta=text[r.emitted:]))
            r.emitted = len(text)

    def finish(self, r: Request, reason: str | None, error: str | None = None) -> None:
        if r.finished:
            return
        r.finished = True
        if self.metrics:
            self.metrics.finished(r, time.perf_counter() - r.created, error is not None)
        r.sink(Event(finish_reason=reason or "error", error=error,
                     prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.tokens)))

    def drop(self, done: list[Request]) -> None:
        """Remove requests from the batch, moving the last row into each freed row."""
        for r in done:
            if r not in self.active:
                continue
            if not r.finished:
                self.finish(r, "cancelled")
            i, last = self.active.index(r), len(self.active) - 1
            if i != last:
                moved = self.active[last]
                self.cache.move_row(last, i, moved.length)
                self.active[i] = moved
            self.active.pop()

