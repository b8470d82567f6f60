"""The engine: continuous batching of every caller's requests over one backbone.

One background thread owns the runner (bot.engine.runner). Between two steps it
applies adapter loads/unloads, answers a slice of the waiting classification work in
one mixed-adapter pass, admits new requests (each gets a row of the key/value cache)
and drops requests that finished or whose client went away. A step then runs one
forward pass over a ragged batch: one token for every decoding request and a chunk of
at most ``prefill_chunk`` prompt tokens for the requests being prefilled, so a long
prompt never stalls the running streams for more than one chunk. Each token carries
its request's adapter; sampling settings are per request.

Every caller uses this: ``bot chat``, the demo, ``bot serve``, ``bot eval``'s sample
replies, ``bot bench`` and ``bot distill`` (one request type, one SamplingParams,
requests in, token events out).
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

from bot.engine.lean import Segment
from bot.engine.lora import Mixture, adapter_names
from bot.engine.pooling import pool_windows
from bot.engine.runner import make_runner
from bot.engine.sampling import SamplingParams, next_token, top_logprobs
from bot.engine.threads import release_pool
from bot.errors import QueueFull, ServeError, UnknownModel

log = logging.getLogger(__name__)
_ids = itertools.count(1)
# prompt tokens prefilled per step (beside the decoding rows): bounds how long one step
# can hold up the running streams (about 0.1-0.2 s on 2 cores); 0/None = whole prompts
PREFILL_CHUNK = 128
# classification texts answered between two steps
CLASSIFY_SLICE = 8  # about 83 ms a text on 2 cores: ~0.7 s of decode stall per slice at most


@dataclass
class Event:
    """What a request's sink receives: text deltas, then one final event."""

    delta: str = ""
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # the new token(s) of this delta
    # the final event of a reply that ended on an end-of-sequence id carries that id here
    eos_id: int | None = None
    # with SamplingParams.logprobs: per new token, (logprob, [(alternative id, logprob), ...])
    logprobs: list = field(default_factory=list)


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    sink: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    slot: int = -1
    length: int = 0  # tokens whose keys are in the cache
    emitted: int = 0  # characters of the decoded reply already sent
    first_token_at: float | None = None
    finished: bool = False
    cancelled: bool = False
    gen: torch.Generator | None = None
    matcher: object | None = None  # the grammar's state for this reply (SamplingParams.grammar)

    def __post_init__(self):
        if self.params.grammar is not None and self.matcher is None:
            self.matcher = self.params.grammar.matcher()

    def cancel(self) -> None:
        """Free this request's row at the next step (e.g. its client disconnected)."""
        self.cancelled = True

    @property
    def prefilling(self) -> bool:
        return self.length < len(self.prompt_ids)


@dataclass
class _ClassifyJob:
    texts: list[str]
    adapters: list[str]
    max_length: int
    future: Future
    cancelled: Callable[[], bool] | None = None
    done: int = 0
    results: list = field(default_factory=list)
    kind: str = "classify"  # or "embed": mean-pooled hidden states (embed_now)


class BlockingCalls:
    """The synchronous client side of ``submit``: wait on one request's events in the caller's thread."""

    def stream(self, prompt_ids: list[int], adapter: str | None,
               params: SamplingParams) -> Iterator[str]:
        """Blocking helper: yield the reply's text pieces as they are decoded."""
        for ev in self.events(prompt_ids, adapter, params):
            if ev.delta:
                yield ev.delta

    def events(self, prompt_ids: list[int], adapter: str | None,
               params: SamplingParams) -> Iterator[Event]:
        """Blocking helper: every event of one request (the last one has ``finish_reason``)."""
        events: queue.Queue[Event] = queue.Queue()
        release_pool()  # this thread waits on the engine: its OpenMP team would slow the steps
        req = self.submit(prompt_ids, adapter, params, events.put)
        try:
            while True:
                ev = events.get()
                if ev.error:
                    raise ServeError(ev.error)
                yield ev
                if ev.finish_reason:
                    return
        finally:
            req.cancel()

    def generate(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> str:
        return "".join(self.stream(prompt_ids, adapter, params))

    def generate_ids(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams,
                     with_eos: bool = False) -> list[int]:
        """The reply's token ids (``with_eos``: with the end-of-sequence id it ended on, as
        transformers' ``generate()`` returns it)."""
        out = []
        for ev in self.events(prompt_ids, adapter, params):
            out += ev.token_ids
            if with_eos and ev.eos_id is not None:
                out.append(ev.eos_id)
        return out


class Scheduler(BlockingCalls):
    """Serve many generation and classification requests over one shared backbone.

    Args:
        backbone: the loaded Backbone with its adapters.
        classifiers: {name: ClassifyTask} answering classification jobs.
        generators: names of the generation adapters to serve.
        precision: "auto" (bot.engine.tuning's measured choice), a kernel of
            bot.engine.precision.KINDS for every step, or "small,large".
        max_batch: requests decoding at once.
        max_queue: requests (and classification jobs) waiting or running before new ones
            are refused (429).
        max_len: context limit per request (prompt + reply tokens).
        prefill_chunk: prompt tokens prefilled per step.
        auto_adapters: serve any generation adapter loaded on the backbone on first use
            (the backbone's shared library engine).
    """

    def __init__(self, backbone, classifiers: dict | None = None, generators: list[str] | None = None,
                 precision: str = "auto", max_batch: int = 16, max_queue: int = 64,
                 max_len: int = 2048, metrics=None, prefill_chunk: int | None = PREFILL_CHUNK,
                 auto_adapters: bool = False):
        self.backbone = backbone
        self.tokenizer = backbone.tokenizer
        limit = getattr(backbone.base.config, "max_position_embeddings", None) or max_len
        self.max_len = min(max_len, limit)
        self.runner = make_runner(backbone, precision, max_batch, self.max_len)
        self.prefill_chunk = prefill_chunk if self.runner.chunked else None
        self.classifiers = dict(classifiers or {})
        for name in generators or []:
            self.runner.add_adapter(name)
        self.max_batch, self.max_queue, self.auto_adapters = max_batch, max_queue, auto_adapters
        self.batch = DecodeBatch(self.runner, self.tokenizer, eos_ids(backbone), self.max_len)
        self.batch.metrics = metrics
        self._cond = threading.Condition()
        self._waiting: list[Request] = []
        self._jobs: list[tuple[Callable, Future]] = []
        self._classify = ClassifyQueue(backbone, self.classifiers, self._cond)
        self._thread: threading.Thread | None = None
        self._retiring: set[str] = set()
        self._stop = False

    # ------------------------------------------------------------ public
    @property
    def precision(self) -> str:
        """The runner's kernel(s), e.g. ``w8`` or ``w8,bf16`` (small, large)."""
        return self.runner.precision

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

    @property
    def generators(self) -> list[str]:
        return list(self.runner.adapters)

    def queue_depth(self) -> int:
        return len(self._waiting) + len(self._classify)

    def in_flight(self) -> int:
        return len(self._waiting) + len(self._active) + len(self._classify)

    def start(self) -> Scheduler:
        with self._cond:
            if self._thread is None:
                threads = torch.get_num_threads()
                # this thread built the runner: its OpenMP team would slow every step (threads.py)
                release_pool()
                self._thread = threading.Thread(target=self._loop, args=(threads,),
                                                name="bot-engine", daemon=True)
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
        """Queue a generation request; events arrive on ``sink`` from the engine thread.

        Raises:
            UnknownModel: ``adapter`` is not a served generation adapter.
            ServeError: the prompt and ``max_tokens`` exceed the context limit.
            QueueFull: ``max_queue`` requests are already waiting or running.
        """
        params.check()
        if threading.current_thread() is not self._thread:
            release_pool()  # a caller's own OpenMP team would slow every step (bot.engine.threads)
        if (self.auto_adapters and adapter is not None and adapter not in self.runner.adapters
                and adapter in self.backbone.adapters):
            self.call(lambda: adapter in self.runner.adapters or self.runner.add_adapter(adapter))
        names = adapter_names(adapter)
        if any(n not in self.runner.adapters or n in self._retiring for n in names):
            raise UnknownModel(f"generation adapter '{adapter}' is not loaded; served: "
                               f"{self.generators}")
        if isinstance(adapter, Mixture) and self.runner.name != "lean":
            raise ServeError("adapter mixtures need the lean engine (bot.engine.lora); this "
                             "backbone runs on transformers' forward. Fix: name one adapter")
        if not prompt_ids:
            raise ServeError("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.max_len:
            raise ServeError(
                f"this request needs {len(prompt_ids)} prompt tokens + max_tokens "
                f"{params.max_tokens} = {len(prompt_ids) + params.max_tokens}, over the context "
                f"limit of {self.max_len} tokens. Fix: shorten the messages or lower max_tokens")
        req = Request(list(prompt_ids), adapter, params, sink)
        req.gen = params.generator()
        _enqueue(self, lambda: self._waiting.append(req))
        return req

    def classify(self, texts: list[str], adapters: list[str], max_length: int = 256,
                 cancelled: Callable[[], bool] | None = None) -> list[dict[str, float]]:
        """Label probabilities for each (text, classify adapter) pair.

        The work is answered in slices of ``CLASSIFY_SLICE`` texts between decode steps
        (every caller's waiting texts share a mixed-adapter pass), counts toward
        ``max_queue``, and is dropped at the next slice once ``cancelled()`` is true.
        """
        unknown = sorted({a for a in adapters if a not in self.classifiers})
        if unknown:
            raise UnknownModel(f"classify adapter(s) {unknown} are not loaded; served: "
                               f"{sorted(self.classifiers)}")
        return self._classify.run(self, _ClassifyJob(list(texts), list(adapters), max_length, Future(),
                                                      cancelled))

    def embed(self, texts: list[str], adapters: list[str | None], max_length: int = 256,
              cancelled: Callable[[], bool] | None = None) -> list[torch.Tensor]:
        """Each (text, adapter or None)'s unit-length mean-pooled final states (embed_now),
        queued, sliced, counted and cancelled as :meth:`classify`."""
        unknown = sorted({a for a in adapters if a is not None and a not in self.backbone.adapters})
        if unknown:
            raise UnknownModel(f"adapter(s) {unknown} are not loaded on the backbone")
        return self._classify.run(self, _ClassifyJob(list(texts), list(adapters), max_length,
                                                     Future(), cancelled, kind="embed"))

    def add_adapter(self, name: str, task=None) -> None:
        """Serve adapter ``name`` (already loaded on the backbone) from the next step on."""
        def apply():
            if task is not None and task.kind == "classify":
                self.classifiers[name] = task
            else:
                self.runner.add_adapter(name)
        self.call(apply)

    def remove_adapter(self, name: str) -> None:
        """Stop serving ``name``; requests already decoding with it finish first."""
        def apply():
            self.classifiers.pop(name, None)
            if name in self.runner.adapters:
                self.runner.remove_adapter(name)
        self._retiring.add(name)
        try:
            while any(name in adapter_names(r.adapter) for r in self._active + self._waiting):
                time.sleep(0.02)
            self.call(apply)
        finally:
            self._retiring.discard(name)

    def call(self, fn: Callable):
        """Run ``fn`` on the engine thread between two steps; return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future = Future()
        with self._cond:
            self._jobs.append((fn, fut))
            self._cond.notify_all()
        self.start()
        return fut.result()

    # -------------------------------------------------------------- loop
    def _loop(self, threads: int) -> None:
        torch.set_num_threads(threads)  # OpenMP's thread count is per thread: the starter's
        with torch.inference_mode():
            self._run()

    def _busy(self) -> bool:
        return bool(self._stop or self._jobs or self._classify or self._waiting or self._active)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._busy():  # idle: give the OpenMP team back (threads.py), another
                    release_pool()  # engine (a benchmark's, a library one) may decode now
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
            if self._classify:
                self._classify.slice(self.metrics)
            self._admit()
            try:
                if self._active:
                    self.batch.step(self.prefill_chunk)
            except Exception as err:  # a failed step fails its requests, never the server
                log.exception("engine step failed")
                for req in list(self._active):
                    self.batch.finish(req, None, error=f"internal error: {type(err).__name__}: {err}")
                self.batch.release(list(self._active))

    def _admit(self) -> None:
        self.batch.release([r for r in self.batch.active if r.cancelled])
        with self._cond:
            free = self.max_batch - len(self.batch.active)
            fresh, self._waiting = self._waiting[:free], self._waiting[free:]
        for r in fresh:
            if r.cancelled:
                self.batch.finish(r, "cancelled")
            else:
                self.batch.admit(r)

    def _fail_all(self, message: str) -> None:
        for r in self._active + self._waiting:
            self.batch.finish(r, None, error=message)
        self._active.clear()
        self._waiting = []
        for _, fut in self._jobs:
            fut.set_exception(ServeError(message))
        for job in list(self._classify.jobs):
            self._classify.end(job, error=ServeError(message))


def _enqueue(sched: Scheduler, put: Callable[[], None]) -> None:
    """``put()`` one request or job into ``sched``'s waiting work, unless ``max_queue`` is reached."""
    with sched._cond:
        if sched.in_flight() >= sched.max_queue:
            raise QueueFull(f"the server is busy: {sched.in_flight()} requests in flight "
                            f"(limit {sched.max_queue}); retry shortly")
        put()
        sched._cond.notify_all()
    sched.start()


class ClassifyQueue:
    """Classification work waiting between decode steps, answered a slice at a time."""

    def __init__(self, backbone, classifiers: dict, cond: threading.Condition):
        self.backbone, self.classifiers, self._cond = backbone, classifiers, cond
        self.jobs: list[_ClassifyJob] = []

    def __len__(self) -> int:
        return len(self.jobs)

    def run(self, sched: Scheduler, job: _ClassifyJob) -> list:
        """Queue ``job`` (refused while ``sched`` is full), wake the engine, wait for the answer."""
        if not job.texts:
            return []
        # shortest texts first: a slice's texts are padded to its longest, so similar lengths
        # together waste less (64 chat prompts of 3-40 tokens on AVX2: 5.2 -> 4.1 s)
        order = sorted(range(len(job.texts)), key=lambda i: len(job.texts[i]))
        job.texts, job.adapters = [job.texts[i] for i in order], [job.adapters[i] for i in order]
        release_pool()
        _enqueue(sched, lambda: self.jobs.append(job))
        answers = job.future.result()
        out: list = [None] * len(answers)
        for pos, i in enumerate(order):
            out[i] = answers[pos]
        return out

    def slice(self, metrics) -> None:
        """Answer up to CLASSIFY_SLICE waiting texts (oldest jobs first) in one pass."""
        with self._cond:
            jobs = list(self.jobs)
        picked, room = [], CLASSIFY_SLICE
        for job in jobs:
            if job.cancelled is not None and job.cancelled():
                self.end(job, error=ServeError("the client went away"))
                continue
            take = min(room, len(job.texts) - job.done)
            if take > 0:
                picked.append((job, take))
                room -= take
        by_len: dict[tuple, list] = {}
        for job, take in picked:
            by_len.setdefault((job.kind, job.max_length), []).append((job, take))
        for (kind, max_length), group in by_len.items():
            texts = [t for job, take in group for t in job.texts[job.done:job.done + take]]
            names = [a for job, take in group for a in job.adapters[job.done:job.done + take]]
            try:
                if kind == "embed":
                    probs = embed_now(self.backbone, texts, names, max_length)
                else:
                    probs = classify_now(self.backbone, self.classifiers, texts, names, max_length)
            except Exception as err:  # noqa: BLE001 (handed to each caller)
                for job, _ in group:
                    self.end(job, error=err)
                continue
            start = 0
            for job, take in group:
                job.results += probs[start:start + take]
                job.done += take
                start += take
                if job.done == len(job.texts):
                    self.end(job)
            if metrics and kind == "classify":
                metrics.classified(len(texts))

    def end(self, job: _ClassifyJob, error: BaseException | None = None) -> None:
        with self._cond:
            if job in self.jobs:
                self.jobs.remove(job)
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(job.results)


class DecodeBatch:
    """The requests holding a cache row: one engine step over them, sampling, streaming, removal.

    Args:
        runner: runs the step (bot.engine.runner).
        tokenizer: decodes the streamed text.
        eos: token ids that end a reply.
        max_len: the context limit per request.
    """

    def __init__(self, runner, tokenizer, eos: set[int], max_len: int):
        self.runner, self.tokenizer, self.eos, self.max_len = runner, tokenizer, eos, max_len
        self.prefixes = getattr(runner, "prefixes", None)  # the lean runner's (bot.engine.prefix)
        self.active: list[Request] = []
        self.steps = 0
        self.metrics = None

    def admit(self, r: Request) -> None:
        """Give ``r`` the next free row; its prompt is prefilled over the next steps (from
        the end of a stored start it shares with an earlier prompt: bot.engine.prefix)."""
        r.slot, r.length = len(self.active), 0
        if self.prefixes is not None:
            r.length = self.prefixes.restore(r.slot, r.prompt_ids, r.adapter)
        self.active.append(r)

    def step(self, prefill_chunk: int | None) -> None:
        segments, owners = [], []
        budget = prefill_chunk or float("inf")
        for r in self.active:
            if not r.prefilling:
                segments.append(Segment(r.slot, r.length, [r.tokens[-1]], r.adapter))
                owners.append((r, 1))
        for r in self.active:
            if r.prefilling and budget > 0:
                take = int(min(budget, len(r.prompt_ids) - r.length))
                last = r.length + take == len(r.prompt_ids)
                segments.append(Segment(r.slot, r.length, r.prompt_ids[r.length:r.length + take],
                                        r.adapter, want=last))
                owners.append((r, take))
                budget -= take
        logits = self.runner.step(segments)
        self.steps += 1
        if self.metrics:
            self.metrics.step(sum(1 for s in segments if len(s.ids) == 1 and s.pos >= 1))
        now = time.perf_counter()
        rows = iter(logits)
        done = []
        for (r, n), seg in zip(owners, segments):
            r.length += n
            if not seg.want:
                continue
            if r.first_token_at is None:
                r.first_token_at = now
                if self.metrics:
                    self.metrics.first_token(r, now - r.created)
                if self.prefixes is not None:
                    self.prefixes.learn(r.slot, r.prompt_ids, r.adapter)
            self.accept(r, next(rows))
            if r.finished:
                done.append(r)
        self.release(done)

    def accept(self, r: Request, logits: torch.Tensor) -> None:
        """Sample the next token for ``r``, stream its text, decide whether it is done.

        A request with a grammar gets its row masked here (tokens the grammar forbids at
        this point cannot be drawn), so constrained and free requests share every step.
        """
        seen = torch.tensor(r.prompt_ids + r.tokens) if r.params.repetition_penalty != 1.0 else \
            torch.empty(0, dtype=torch.long)
        raw = logits
        if r.matcher is not None:
            logits = r.matcher.mask(logits)
        tok = next_token(logits, r.params, seen, r.gen)
        lp = None
        if r.params.logprobs is not None:
            lp = top_logprobs(raw, tok, r.params.logprobs)
        if r.matcher is not None:
            if tok == r.matcher.eos or not r.matcher.consume(tok):
                self.finish(r, "stop", eos_id=tok if tok in self.eos else None)
                return
        elif tok in self.eos:
            self.finish(r, "stop", eos_id=tok)
            return
        r.tokens.append(tok)
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        for stop in r.params.stop:
            cut = text.find(stop)
            if cut >= 0:
                self.emit(r, text[:cut], tok, lp)
                self.finish(r, "stop")
                return
        if r.matcher is not None and r.matcher.done():  # the grammar allows nothing more
            self.emit(r, text, tok, lp)
            self.finish(r, "stop")
            return
        if len(r.tokens) >= r.params.max_tokens or r.length + 1 >= self.max_len:
            self.emit(r, text, tok, lp)
            self.finish(r, "length")
            return
        # hold back a possible beginning of a stop string, and half a UTF-8 character
        hold = max((len(s) - 1 for s in r.params.stop), default=0)
        safe = text[:len(text) - hold] if hold else text
        self.emit(r, "" if safe.endswith("\ufffd") else safe, tok, lp)

    def emit(self, r: Request, text: str, tok: int, lp: tuple | None = None) -> None:
        delta = text[r.emitted:] if len(text) > r.emitted else ""
        r.sink(Event(delta=delta, token_ids=[tok], logprobs=[lp] if lp is not None else []))
        r.emitted = max(r.emitted, len(text))

    def finish(self, r: Request, reason: str | None, error: str | None = None,
                eos_id: int | None = None) -> None:
        if r.finished:
            return
        r.finished = True
        if self.metrics:
            self.metrics.finished(r, time.perf_counter() - r.created, error is not None)
        r.sink(Event(finish_reason=reason or "error", error=error, eos_id=eos_id,
                     prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.tokens)))

    def release(self, done: list[Request]) -> None:
        """Remove requests, moving the request in the last row into each freed row."""
        for r in done:
            if r not in self.active:
                continue
            if not r.finished:
                self.finish(r, "cancelled")
            last = max(self.active, key=lambda x: x.slot)
            if last is not r:
                self.runner.move(last.slot, r.slot, last.length)
                last.slot = r.slot
            self.active.remove(r)


def eos_ids(backbone) -> set[int]:
    """Token ids that end a reply: the generation config's, the tokenizer's, and ``<|im_end|>``."""
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


def classify_now(backbone, classifiers: dict, texts: list[str], adapters: list[str],
                 max_length: int = 256, chunk: int = 32) -> list[dict[str, float]]:
    """One mixed-adapter pass per chunk: text i runs ``adapters[i]``.

    A text longer than its adapter's ``max_length`` is read whole: its windows run as rows
    like any other, and ``pool_windows`` combines them (as ``ClassifyTask.predict`` does).
    """
    rows = [(i, p) for i, (x, n) in enumerate(zip(texts, adapters, strict=True))
            for p in classifiers[n].prompts(x, max_length)]
    log_probs: list = [None] * len(rows)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        names = [adapters[i] for i, _ in part]
        states = backbone.pooled([p for _, p in part], names, max_length)
        for j, (name, s) in enumerate(zip(names, states)):
            log_probs[start + j] = classifiers[name].log_probs_from_states(s[None])[0]
    per_text: list[list] = [[] for _ in texts]  # rows are in text order: one pass groups them
    for (owner, _), lp in zip(rows, log_probs):
        per_text[owner].append(lp)
    out = []
    for name, mine in zip(adapters, per_text):
        pooled = pool_windows(torch.stack(mine), [0] * len(mine))[0].exp()
        out.append(dict(zip(classifiers[name].labels, pooled.tolist())))
    return out


EMBED_TOKENS = 2048  # padded tokens per embedding pass (every layer's states are kept: ~150 MB)


def embed_now(backbone, texts: list[str], adapters: list[str | None],
              max_length: int = 256) -> list[torch.Tensor]:
    """Each text's final hidden states averaged over its real tokens, L2-normalised (float32).

    Row i runs ``adapters[i]`` (None = the bare backbone). Texts are taken shortest first in
    passes of at most EMBED_TOKENS padded tokens, so long ones never share a pass's padding.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[torch.Tensor | None] = [None] * len(texts)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * min(len(texts[order[end]]), max_length) \
                <= EMBED_TOKENS:
            end += 1
        rows = order[start:end]
        batch = backbone.encode([texts[i] for i in rows], max_length)
        states = backbone.forward(batch, [adapters[i] for i in rows], output_hidden_states=True,
                                  logits_to_keep=1).hidden_states[-1].float()
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        for i, vec in zip(rows, torch.nn.functional.normalize(pooled, dim=-1)):
            out[i] = vec.cpu()
        start = end
    return out
