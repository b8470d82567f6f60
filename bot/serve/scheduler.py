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

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import torch

from .batch import DecodeBatch, Event, Request
from .cache import SlotCache
from .lora import LoraEngine
from .sampling import SamplingParams

log = logging.getLogger(__name__)


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


def auto_precision(backbone=None, device=None) -> str:
    """The kernel bot.kernels measured (and cached) for this CPU and ``backbone``; bf16 on GPUs.

    Without a backbone (nothing to measure on): int8 weights where the CPU has native
    bf16 math, exact float32 elsewhere (AVX2-only CPUs emulate bf16; DATA.md).
    """
    device = device if device is not None else getattr(backbone, "device", None)
    if device is not None and device.type != "cpu":
        return "bf16"
    if backbone is not None:
        from ..kernels import choose

        return choose(backbone).kind
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
        precision: "auto" (bot.kernels' measured choice) or a kernel of bot.kernels.KINDS
            ("fp32" is exact and shares the backbone's weights).
        max_batch: requests decoding at once.
        max_queue: requests waiting or running before new ones are refused (429).
        max_len: context limit per request (prompt + reply tokens).
    """

    def __init__(self, backbone, classifiers: dict | None = None, generators: list[str] | None = None,
                 precision: str = "auto", max_batch: int = 16, max_queue: int = 64,
                 max_len: int = 2048, metrics=None):
        self.backbone = backbone
        self.tokenizer = backbone.tokenizer
        self.precision = auto_precision(backbone) if precision == "auto" else precision
        self.engine = LoraEngine(backbone, self.precision)
        self.classifiers = dict(classifiers or {})
        for name in generators or []:
            self.engine.add_adapter(name)
        self.max_batch = max_batch
        self.max_queue = max_queue
        limit = getattr(backbone.base.config, "max_position_embeddings", None) or max_len
        self.max_len = min(max_len, limit)
        self.batch = DecodeBatch(self.engine, SlotCache(max_batch, self.max_len), self.tokenizer,
                                 _eos_ids(backbone), self.max_len)
        self.batch.metrics = metrics
        self.batch.on_admitted = self._admitted
        self._cond = threading.Condition()
        self._waiting: list[Request] = []
        self._jobs: list[tuple[Callable, Future]] = []
        self._classify: list[tuple] = []
        self._admitting: list[Request] = []  # taken from the queue, not yet prefilled
        self._thread: threading.Thread | None = None
        self._retiring: set[str] = set()
        self._stop = False

    # ------------------------------------------------------------ public
    @property
    def metrics(self):
        return self.batch.metrics

    @metrics.setter
    def metrics(self, value) -> None:
        self.batch.metrics = value

    @property
    def eos(self) -> set[int]:
        """Token ids that end a reply (tests on random models clear it to run full lengths)."""
        return self.batch.eos

    @eos.setter
    def eos(self, value: set[int]) -> None:
        self.batch.eos = value

    @property
    def steps(self) -> int:
        return self.batch.steps

    @property
    def _active(self) -> list[Request]:
        return self.batch.active

    def _admitted(self) -> None:
        self._admitting = []

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

    def classify(self, texts: list[str], adapters: list[str],
                 max_length: int = 256) -> list[dict[str, float]]:
        """Label probabilities for each (text, classify adapter) pair.

        Every caller's texts waiting at the next step share one mixed-adapter pass.
        """
        unknown = sorted({a for a in adapters if a not in self.classifiers})
        if unknown:
            raise UnknownModel(f"classify adapter(s) {unknown} are not loaded; served: "
                               f"{sorted(self.classifiers)}")
        fut: Future = Future()
        with self._cond:
            self._classify.append((list(texts), list(adapters), max_length, fut))
            self._cond.notify_all()
        self.start()
        return fut.result()

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
                while not (self._stop or self._jobs or self._classify or self._waiting
                           or self._active):
                    self._cond.wait()
                if self._stop:
                    self._fail_all("the server is shutting down")
                    return
                jobs, self._jobs = self._jobs, []
                classify, self._classify = self._classify, []
            if classify:
                _run_classify(self.backbone, self.classifiers, classify, self.metrics)
            for fn, fut in jobs:
                try:
                    fut.set_result(fn())
                except BaseException as err:  # noqa: BLE001 (handed to the caller)
                    fut.set_exception(err)
            with self._cond:
                free = self.max_batch - len(self._active)
                fresh, self._waiting = self._waiting[:free], self._waiting[free:]
                self._admitting = fresh
            self.batch.drop([r for r in self._active if r.cancelled])
            for r in fresh:
                if r.cancelled:
                    self.batch.finish(r, "cancelled")
            fresh = [r for r in fresh if not r.cancelled]
            try:
                if fresh:
                    self.batch.prefill(fresh)
                if self._active:
                    self.batch.decode()
            except Exception as err:  # a failed step fails its requests, never the server
                log.exception("serving step failed")
                for req in self._active + fresh:
                    self.batch.finish(req, None, error=f"internal error: {type(err).__name__}: {err}")
                self.batch.drop(list(self._active))
            self._admitting = []

    def _fail_all(self, message: str) -> None:
        for r in self._active + self._waiting:
            self.batch.finish(r, None, error=message)
        self.batch.active.clear()
        self._waiting = []
        for _, fut in self._jobs:
            fut.set_exception(ServeError(message))
        for job in self._classify:
            job[3].set_exception(ServeError(message))


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
        formatted = [t.format(x, max_length) for t, x in zip(tasks, texts[start:start + chunk])]
        states = backbone.pooled(formatted, names, max_length)
        out += [dict(zip(t.labels, t.probs_from_states(s[None])[0].tolist()))
                for t, s in zip(tasks, states)]
    return out


def _run_classify(backbone, classifiers: dict, jobs: list, metrics) -> None:
    """Answer every waiting classification job in as few forward passes as possible."""
    by_len: dict[int, list] = {}
    for job in jobs:
        by_len.setdefault(job[2], []).append(job)
    for max_length, group in by_len.items():
        texts = [t for job in group for t in job[0]]
        names = [a for job in group for a in job[1]]
        try:
            probs = _classify_now(backbone, classifiers, texts, names, max_length)
        except Exception as err:  # noqa: BLE001 (handed to each caller)
            for job in group:
                job[3].set_exception(err)
            continue
        start = 0
        for job in group:
            job[3].set_result(probs[start:start + len(job[0])])
            start += len(job[0])
    if metrics:
        metrics.classified(sum(len(job[0]) for job in jobs))
