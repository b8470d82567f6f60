"""ChatSession and Turn: route a message, run the adapter, explain what happened.

One session = one conversation (its own history and previous adapter). Sessions share
the backbone, the tasks and the router; the backbone's lock keeps adapters from
leaking between concurrent sessions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from bot.engine import SamplingParams
from bot.engine.llamacpp import chat_engine
from bot.engine.threads import off_engine
from bot.errors import BotError
from bot.manifests.registry import load_all
from bot.model.backbone import Backbone
from bot.routing import build_router
from bot.routing.abstain import clarify
from bot.tasks.classify import ClassifyTask
from bot.util.assets import default_adapters_dir
from bot.util.text import MAX_CHARS

MAX_NEW_TOKENS = 160
ANALYSIS_TOKENS = 128  # the chips need a text's opening, not a whole article
REPETITION_PENALTY = 1.1  # greedy replies of a 135M model loop without it
GENERATING = ("generate", "base")  # task kinds that answer with generated text
_SCHEDULER_LOCK = threading.Lock()
log = logging.getLogger(__name__)


@dataclass
class Turn:
    """One answered message."""

    user: str
    reply: str
    adapter: str | None
    route: object | None = None
    label_scores: dict[str, float] | None = None
    analysis: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notice: str = ""
    abstained: bool = False  # the router was unsure and the reply asks which route was meant

    def chips(self) -> str:
        """e.g. ``sentiment: negative 0.93 · topic: tech 0.64``."""
        parts = []
        for name, probs in self.analysis.items():
            label = max(probs, key=probs.get)
            parts.append(f"{name}: {label} {probs[label]:.2f}")
        return " · ".join(parts)

    def explain(self) -> str:
        """Adapter, confidence, runner-up and latency on one line."""
        if self.route is None:
            return self.notice
        r = self.route
        runner = f", runner-up {r.runner_up} {r.runner_up_score:.2f}" if r.runner_up else ""
        ms = self.timings.get("total_ms", 0.0)
        return f"adapter {self.adapter} ({r.score:.2f}{runner}) · {ms:.0f} ms · {r.reason}"


class ChatSession:
    """A conversation over shared tasks and router.

    Args:
        backbone: the loaded Backbone.
        tasks: {adapter name: Task} (see bot.manifests.registry.load_all).
        router: a fitted bot.routing.Router.
        max_chars: longer messages are cut, with a notice.
    """

    def __init__(self, backbone, tasks: dict, router, max_chars: int = MAX_CHARS,
                 max_new_tokens: int = MAX_NEW_TOKENS, scheduler=None, llama=None):
        self.backbone = backbone
        self.tasks = tasks
        self.router = router
        self.max_chars = max_chars
        self.max_new_tokens = max_new_tokens
        self.history: list[dict] = []
        self.previous: str | None = None
        self.failures: dict[str, str] = {}
        self._scheduler = scheduler
        # bot.engine.llamacpp.LlamaCppGenerator for generated replies (`bot chat --engine llamacpp`)
        self.llama = llama
        self._llama_usable: dict[str, bool] = {}  # adapter -> GGUF LoRA written (checked once)

    @classmethod
    def from_dir(cls, backbone=None, adapters_dir=None, encoder=None, **kwargs) -> ChatSession:
        """Load every adapter in ``adapters_dir`` and build (or reuse) the fitted router."""
        backbone = backbone or Backbone.load()
        tasks, failures = load_all(backbone, adapters_dir or default_adapters_dir())
        router = build_router([t.spec for t in tasks.values()], encoder, backbone=backbone)
        session = cls(backbone, tasks, router, **kwargs)
        session.failures = failures
        return session

    def warm_up(self) -> float:
        """Build the generation engines and run each path once, so the first user waits less.

        Returns the seconds it took.
        """
        t0 = time.perf_counter()
        for task in self.tasks.values():
            if task.kind in GENERATING:
                "".join(self._generate(task, "hello", max_tokens=2, history=[]))
        with off_engine():
            self.router.route("hello")
        self._analyse("hello")
        return time.perf_counter() - t0

    def fork(self) -> ChatSession:
        """A fresh conversation sharing this one's models and scheduler (one per browser tab)."""
        other = ChatSession(self.backbone, self.tasks, self.router, self.max_chars,
                            self.max_new_tokens, scheduler=self.scheduler, llama=self.llama)
        other.failures = self.failures
        return other

    @property
    def scheduler(self):
        """The continuous-batching scheduler every fork of this session shares (bot.serve).

        Browser tabs and terminal sessions decode in the same batches instead of queueing.
        """
        with _SCHEDULER_LOCK:
            if self._scheduler is None:
                # lazy: bot.serve imports fastapi, which is heavy
                from bot.serve.state import scheduler_for

                self._scheduler = scheduler_for(self.backbone, self.tasks).start()
            return self._scheduler

    @property
    def classifiers(self) -> list[ClassifyTask]:
        return [t for t in self.tasks.values() if isinstance(t, ClassifyTask)]

    # ------------------------------------------------------------------ turns
    def send(self, text: str, force: str | None = None, abstain: bool | None = None) -> Turn:
        """Answer ``text`` and return the finished Turn."""
        last = None
        for _, last in self.stream(text, force, abstain):  # noqa: B007 (we want the final Turn)
            pass
        return last

    def stream(self, text: str, force: str | None = None,
               abstain: bool | None = None) -> Iterator[tuple[str, Turn | None]]:
        """Yield (reply so far, None) while generating, then (reply, Turn) once.

        Args:
            abstain: ask which route was meant when the router is unsure (below its threshold
                fitted on validation, bot.routing.abstain); None: the fitted default.
        """
        t0 = time.perf_counter()
        text = (text or "").strip()
        if not text:
            yield "", Turn(user="", reply="", adapter=None, notice="Type a message to start.")
            return
        notice = ""
        if len(text) > self.max_chars:
            notice = f"Your message was cut to {self.max_chars} of its {len(text)} characters."
            text = text[: self.max_chars]
        if force and force != "auto":
            text = f"/{force} {text}" if not text.startswith("/") else text
        with off_engine():  # the router's encoder runs here, not on the engine thread
            route = self.router.route(text, previous=self.previous)
        t_route = time.perf_counter()
        body = route.text or text
        question = clarify(self.router, route, abstain)
        if question:  # unsure: a short question listing the likely routes, no adapter runs
            route = replace(route, reason=f"{route.reason}; score below the abstain threshold "
                                          f"{self.router.abstain.threshold:.2f}: asked which route was meant")
            turn = Turn(text, question, None, route, notice=notice, abstained=True)
            yield question, self._finish(turn, t0, t_route, t_route)
            return
        if route.override and route.adapter != "help" and not route.text.strip():
            # a bare "/topic": there is nothing to classify, and "/topic" itself is not a message
            hint = f"Type a message after /{route.adapter}, e.g. /{route.adapter} your text here"
            yield hint, self._finish(Turn(text, hint, None, notice=notice), t0, t_route, t_route)
            return
        if route.adapter == "help":
            turn = Turn(text, self.router.help_text(), "help", route, notice=notice)
            yield turn.reply, self._finish(turn, t0, t_route, t_route)
            return
        adapter = route.adapter if route.adapter in self.tasks else self._fallback()
        analysis = self._analyse(body)
        t_analysis = time.perf_counter()
        task = self.tasks.get(adapter)
        if task is None:
            turn = Turn(text, "No adapter is loaded; train one with `bot train NAME`.", None, route,
                        analysis=analysis, notice=notice)
            yield turn.reply, self._finish(turn, t0, t_route, t_analysis)
            return
        if isinstance(task, ClassifyTask):
            probs = analysis[adapter]
            turn = Turn(text, task.reply(probs), adapter, route, probs, analysis, notice=notice)
            yield turn.reply, self._finish(turn, t0, t_route, t_analysis)
            return
        reply, first = "", None
        for piece in self._generate(task, body):
            first = first or time.perf_counter()
            reply += piece
            yield reply, None
        turn = Turn(text, reply.strip(), adapter, route, None, analysis, notice=notice)
        turn.timings["first_token_ms"] = ((first or time.perf_counter()) - t0) * 1000
        yield turn.reply, self._finish(turn, t0, t_route, t_analysis)

    def _fallback(self) -> str | None:
        if self.router.fallback in self.tasks:
            return self.router.fallback
        return next(iter(self.tasks), None)

    def _analyse(self, text: str) -> dict[str, dict[str, float]]:
        """Every classify adapter on ``text``, in the scheduler's next mixed-adapter batch."""
        names = [t.name for t in self.classifiers]
        if not names:
            return {}
        probs = self.scheduler.classify([text] * len(names), names, max_length=ANALYSIS_TOKENS)
        return dict(zip(names, probs))

    def _generate(self, task, text: str, max_tokens: int | None = None,
                  history: list[dict] | None = None) -> Iterator[str]:
        """Stream a generated reply; decoding happens in the shared scheduler's batches."""
        ids = task.prompt_ids(text, self.history if history is None else history)[0].tolist()
        if self.llama is not None and self._llama_can(task.adapter_name):
            yield from self.llama.stream(ids, task.adapter_name, max_tokens or self.max_new_tokens,
                                         repetition_penalty=REPETITION_PENALTY)
            return
        params = SamplingParams(max_tokens=max_tokens or self.max_new_tokens,
                                repetition_penalty=REPETITION_PENALTY)
        # A base-kind task (the assistant route) decodes with no adapter: the bare backbone.
        yield from self.scheduler.stream(ids, task.adapter_name, params)

    def _llama_can(self, adapter: str | None) -> bool:
        """Whether llama.cpp can run ``adapter`` (its GGUF LoRA file is written on first use)."""
        if adapter is None:
            return True
        if adapter not in self._llama_usable:
            try:
                self.llama.lora_file(adapter)
                self._llama_usable[adapter] = True
            except BotError as err:  # e.g. an adapter on a layer llama.cpp has no tensor for
                log.warning("adapter %s stays on PyTorch: %s", adapter, err)
                self._llama_usable[adapter] = False
        return self._llama_usable[adapter]

    def _finish(self, turn: Turn, t0: float, t_route: float, t_analysis: float) -> Turn:
        now = time.perf_counter()
        turn.timings.update(route_ms=(t_route - t0) * 1000, analysis_ms=(t_analysis - t_route) * 1000,
                            total_ms=(now - t0) * 1000)
        if turn.adapter and turn.adapter != "help":
            self.previous = turn.adapter
            self.history += [{"role": "user", "content": turn.user},
                             {"role": "assistant", "content": turn.reply}]
        return turn


def run_terminal_chat(*, adapters_dir: str | Path | None = None, backbone: str | None = None,
                      device: str | None = None, load_in: str | None = None,
                      engine: str | None = None) -> int:
    """`bot chat`: the same session in the terminal (stdin/stdout) until Ctrl-D.

    Args:
        engine: "torch" or "llamacpp" for generated replies (None: $BOT_ENGINE, else torch);
            see bot.engine.llamacpp.chat_engine.
        adapters_dir: folder holding the adapter folders (None: the default).
        backbone: backbone name, folder, .gguf file or hub id (None: the embedded default).
        device: auto|cpu|cuda|mps (None: $BOT_DEVICE or auto).
        load_in: weight precision auto|fp32|bf16|8bit|4bit (None: $BOT_LOAD_IN or auto).
    """
    bb = Backbone.load(backbone, device=device, load_in=load_in)

    llama = chat_engine(bb, engine)
    session = ChatSession.from_dir(bb, adapters_dir, llama=llama)
    for name, err in session.failures.items():
        log.warning("note: adapter %s not loaded: %s", name, err)
    log.info("warming up (serving engine, classifiers, router) ... %.1f s", session.warm_up())
    print(f"adapters: {', '.join(session.tasks)}. /help lists commands; Ctrl-D quits.")
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print()
            return 0
        printed = 0
        print("bot> ", end="", flush=True)
        for partial, turn in session.stream(text):
            print(partial[printed:], end="", flush=True)
            printed = len(partial)
            if turn is not None:
                print()
                if turn.notice:
                    print(f"     ({turn.notice})")
                if turn.route is not None:
                    print(f"     [{turn.explain()}]")
                    if turn.chips():
                        print(f"     [{turn.chips()}]")
