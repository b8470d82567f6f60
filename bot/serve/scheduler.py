"""Continuous batching: every in-flight request decodes in the same forward step.

One background thread owns the serving engine. Between two decode steps it
applies adapter loads/unloads, answers waiting classification jobs in one
mixed-adapter pass, prefills newly arrived requests (batched, right-padded) and
drops requests that finished or whose client went away. A step then feeds every
live request's last token through the model at once, each row with its own
adapter, position and sampling settings.

What we chose and why (see README "Serve"): transformers' own continuous batching
(``generate_batch`` with a paged cache) packs all requests into one row, which
peft's per-row ``adapter_names`` cannot address, and it targets CUDA kernels;
peft's mixed batches work per row but run on the backbone's shared model behind
its lock, in one precision. A small scheduler of our own over a row-per-request
cache (:mod:`bot.serve.cache`) and a multi-LoRA engine (:mod:`bot.serve.lora`)
keeps every request exact in float32 and lets the base run in int8/bf16.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .cache import SlotCache, decode_mask, prefill_mask
from .lora import LoraEngine
from .sampling import SamplingParams, next_token

log = logging.getLogger(__name__)
_ids = itertools.count(1)


class ServeError(ValueError):
    """A request the scheduler refuses; ``status`` is the HTTP status to answer with."""

    status = 400
    code = "invalid_request_error"


class QueueFull(ServeError):
    status = 429
    code = "rate_limit_exceeded"


class UnknownModel(ServeError):
    status = 404
    code = "model_not_found"


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


def auto_precision() -> str:
    """int8 weights where the CPU has native bf16 math; exact float32 elsewhere.

    Without native bf16 (AVX2-only laptops) the int8 kernel's bf16 activations are
    emulated and slower than a plain float32 matmul (DATA.md's microbenchmark).
    """
    try:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except Exception:
        native = False
    return "w8" if native else "fp32"


class Scheduler:
    """Serve many generation and classification requests over one shared backbone.

    Args:
        backbone: the loaded Backbone with its adapters.
        classifiers: {name: ClassifyTask} answering classification jobs.
        generators: names of the generation adapters to serve.
        precision: "fp32" (exact, shares the backbone's weights), "bf16", "w8" or "auto".
        max_batch: requests decoding at once.
        max_queue: requests waiting or running before new ones are refused (429).
        max_len: context limit per request (prompt + reply tokens).
    """

    def __init__(self, backbone, classifiers: dict | None = None, generators: list[str] | None = None,
                 precision: str = "auto", max_batch: int = 16, max_queue: int = 64,
                 max_len: int = 2048, metrics=None):
        self.backbone = backbone
        self.tokenizer = backbone.tokenizer
        self.precision = auto_precision() if precision == "auto" else precision
        self.engine = LoraEngine(backbone, self.precision)
        self.classifiers = dict(classifiers or {})
        for name in generators or []:
            self.engine.add_adapter(name)
        self.max_batch = max_batch
        self.max_queue = max_queue
        limit = getattr(backbone.base.config, "max_position_embeddings", None) or max_len
        self.max_len = min(max_len, limit)
        self.cache = SlotCache(max_batch, self.max_len)
        self.metrics = metrics
        self.eos = _eos_ids(backbone)
        self._cond = threading.Condition()
        self._waiting: list[Request] = []
        self._jobs: list[tuple[Callable, Future]] = []
        self._active: list[Request] = []
        self._admitting: list[Request] = []  # taken from the queue, not yet prefilled
        self._thread: threading.Thread | None = None
        self._retiring: set[str] = set()
        self._stop = False
        self.steps = 0

    # ------------------------------------------------------------ public
    @property
    def generators(self) -> list[str]:
        return list(self.engine.adapters)

    def queue_depth(self) -> int:
        return len(self._waiting)

    def in_flight(self) -> int:
        return len(self._waiting) + len(self._admitting) + len(self._active)

    def start(self) -> Scheduler:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="bot-scheduler", daemon=True)
                self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams,
               sink: Callable[[Event], None]) -> Request:
        """Queue a generation request; events arrive on ``sink`` from the scheduler thread.

        Raises:
            UnknownModel: ``adapter`` is not a served generation adapter.
            ServeError: the prompt and ``max_tokens`` exceed the context limit.
            QueueFull: ``max_queue`` requests are already waiting or running.
        """
        params.check()
        if adapter is not None and (adapter not in self.engine.adapters or adapter in self._retiring):
            raise UnknownModel(f"generation adapter '{adapter}' is not loaded; served: "
                               f"{self.generators}")
        if not prompt_ids:
            raise ServeError("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.max_len:
            raise ServeError(
                f"this request needs {len(prompt_ids)} prompt tokens + max_tokens "
                f"{params.max_tokens} = {len(prompt_ids) + params.max_tokens}, over the context "
                f"limit of {self.max_len} tokens. Fix: shorten the messages or lower max_tokens")
        req = Request(list(prompt_ids), adapter, params, sink)
        req.gen = params.generator()
        with self._cond:
            if self.in_flight() >= self.max_queue:
                raise QueueFull(f"the server is busy: {self.in_flight()} requests in flight "
                                f"(limit {self.max_queue}); retry shortly")
            self._waiting.append(req)
            self._cond.notify_all()
        self.start()
        return req

    def stream(self, prompt_ids: list[int], adapter: str | None,
               params: SamplingParams) -> Iterator[str]:
        """Blocking helper: yield the reply's text pieces as they are decoded."""
        events: queue.Queue[Event] = queue.Queue()
        req = self.submit(prompt_ids, adapter, params, events.put)
        try:
            while True:
                ev = events.get()
                if ev.error:
                    raise ServeError(ev.error)
                if ev.delta:
                    yield ev.delta
                if ev.finish_reason:
                    return
        finally:
            req.cancel()

    def generate(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> str:
        return "".join(self.stream(prompt_ids, adapter, params))

    def classify(self, texts: list[str], adapters: list[str]) -> list[dict[str, float]]:
        """Label probabilities for each (text, classify adapter) pair, in the next batch."""
        unknown = sorted({a for a in adapters if a not in self.classifiers})
        if unknown:
            raise UnknownModel(f"classify adapter(s) {unknown} are not loaded; served: "
                               f"{sorted(self.classifiers)}")
        return self.call(lambda: _classify_now(self.backbone, self.classifiers, texts, adapters))

    def add_adapter(self, name: str, task=None) -> None:
        """Serve adapter ``name`` (already loaded on the backbone) from the next step on."""
        def apply():
            if task is not None and task.kind == "classify":
                self.classifiers[name] = task
            else:
                self.engine.add_adapter(name)
        self.call(apply)

    def remove_adapter(self, name: str) -> None:
        """Stop serving ``name``; requests already decoding with it finish first."""
        def apply():
            self.classifiers.pop(name, None)
            if name in self.engine.adapters:
                self.engine.remove_adapter(name)
        self._retiring.add(name)
        try:
            while any(r.adapter == name for r in self._active + self._waiting):
                time.sleep(0.02)
            self.call(apply)
        finally:
            self._retiring.discard(name)

    def call(self, fn: Callable):
        """Run ``fn`` on the scheduler thread between two steps; return its result."""
        fut: Future = Future()
        with self._cond:
            self._jobs.append((fn, fut))
            self._cond.notify_all()
        self.start()
        return fut.result()

    # -------------------------------------------------------------- loop
    def _loop(self) -> None:
        # the cache's buffers are inference tensors: every step runs in inference mode
        with torch.inference_mode():
            self._run()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._jobs or self._waiting or self._active):
                    self._cond.wait()
                if self._stop:
                    self._fail_all("the server is shutting down")
                    return
                jobs, self._jobs = self._jobs, []
            for fn, fut in jobs:
                try:
                    fut.set_result(fn())
                except BaseException as err:  # noqa: BLE001 (handed to the caller)
                    fut.set_exception(err)
            with self._cond:
                free = self.max_batch - len(self._active)
                fresh, self._waiting = self._waiting[:free], self._waiting[free:]
                self._admitting = fresh
            self._drop([r for r in self._active if r.cancelled])
            for r in fresh:
                if r.cancelled:
                    self._finish(r, "cancelled")
            fresh = [r for r in fresh if not r.cancelled]
            try:
                if fresh:
                    self._prefill(fresh)
                if self._active:
                    self._decode()
            except Exception as err:  # a failed step fails its requests, never the server
                log.exception("serving step failed")
                for req in self._active + fresh:
                    self._finish(req, None, error=f"internal error: {type(err).__name__}: {err}")
                self._drop(list(self._active))
            self._admitting = []

    def _prefill(self, fresh: list[Request]) -> None:
        first = len(self._active)
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
        self._active.extend(fresh)
        self._admitting = []
        for r, row, n in zip(fresh, logits, lengths):
            r.length = n
            r.first_token_at = now
            if self.metrics:
                self.metrics.first_token(r, now - r.created)
            self._accept(r, row)
        self._drop([r for r in fresh if r.finished])

    def _decode(self) -> None:
        live = self._active
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
        self._drop([r for r in live if r.finished])

    def _accept(self, r: Request, logits: torch.Tensor) -> None:
        """Sample the next token for ``r``, stream its text, decide whether it is done."""
        seen = torch.tensor(r.prompt_ids + r.tokens) if r.params.repetition_penalty != 1.0 else \
            torch.empty(0, dtype=torch.long)
        tok = next_token(logits, r.params, seen, r.gen)
        if tok in self.eos:
            self._finish(r, "stop")
            return
        r.tokens.append(tok)
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        for stop in r.params.stop:
            cut = text.find(stop)
            if cut >= 0:
                self._emit(r, text[:cut])
                self._finish(r, "stop")
                return
        if len(r.tokens) >= r.params.max_tokens or r.length + 1 >= self.max_len:
            self._emit(r, text)
            self._finish(r, "length")
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

    def _finish(self, r: Request, reason: str | None, error: str | None = None) -> None:
        if r.finished:
            return
        r.finished = True
        if self.metrics:
            self.metrics.finished(r, time.perf_counter() - r.created, error is not None)
        r.sink(Event(finish_reason=reason or "error", error=error,
                     prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.tokens)))

    def _drop(self, done: list[Request]) -> None:
        """Remove requests from the batch, moving the last row into each freed row."""
        for r in done:
            if r not in self._active:
                continue
            if not r.finished:
                self._finish(r, "cancelled")
            i, last = self._active.index(r), len(self._active) - 1
            if i != last:
                moved = self._active[last]
                self.cache.move_row(last, i, moved.length)
                self._active[i] = moved
            self._active.pop()

    def _fail_all(self, message: str) -> None:
        for r in self._active + self._waiting:
            self._finish(r, None, error=message)
        self._active, self._waiting = [], []
        for _, fut in self._jobs:
            fut.set_exception(ServeError(message))


def _eos_ids(backbone) -> set[int]:
    ids = set()
    for source in (backbone.base.generation_config, backbone.base.config):
        eos = getattr(source, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    tok = backbone.tokenizer
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    if end is not None:
        ids.add(end)
    return ids


def _classify_now(backbone, classifiers: dict, texts: list[str], adapters: list[str],
                  max_length: int = 256, chunk: int = 32) -> list[dict[str, float]]:
    """One mixed-adapter pass per chunk: row i runs ``adapters[i]`` on ``texts[i]``."""
    out = []
    for start in range(0, len(texts), chunk):
        names = adapters[start:start + chunk]
        tasks = [classifiers[n] for n in names]
        formatted = [t.format(x) for t, x in zip(tasks, texts[start:start + chunk])]
        states = backbone.pooled(formatted, names, max_length)
        out += [dict(zip(t.labels, t.probs_from_states(s[None])[0].tolist()))
                for t, s in zip(tasks, states)]
    return out
