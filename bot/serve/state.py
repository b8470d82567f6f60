"""What a running server holds: backbone, tasks, router, scheduler and its settings."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bot.engine import Scheduler
from bot.engine.lora import Mixture
from bot.engine.threads import off_engine
from bot.errors import AdapterError, FieldError, UnknownModel
from bot.manifests.registry import load_all, load_task
from bot.manifests.spec import AdapterSpec, check_adapter_name
from bot.routing import build_router
from bot.serve.limits import Limits
from bot.serve.prometheus import ServeMetrics

log = logging.getLogger(__name__)


@dataclass
class ChatPlan:
    """How one chat request will be answered."""

    adapter: str | None  # generation adapter (None = bare backbone) or classify adapter
    reply: str | None = None  # set when a classify adapter answered already
    label_scores: dict | None = None
    route: object | None = None

    def shown(self, base_name: str) -> str:
        """The ``x-bot-adapter`` header: the adapter's name, or the base model's."""
        return adapter_name(self.adapter) or base_name

    def body(self) -> dict:
        """The ``bot`` field added to OpenAI's response: which adapter answered and why."""
        out: dict = {"adapter": adapter_name(self.adapter)}
        if self.label_scores is not None:
            out["label_scores"] = self.label_scores
        r = self.route
        if r is not None:
            out["route"] = {"adapter": r.adapter, "score": r.score, "runner_up": r.runner_up,
                            "runner_up_score": r.runner_up_score, "reason": r.reason,
                            "fallback": r.fallback, "scores": r.scores}
        return {"bot": out}


@dataclass
class ServerState:
    """Everything the HTTP layer needs.

    Args:
        backbone: the shared Backbone.
        tasks: {adapter name: Task} loaded on it.
        scheduler: the Scheduler serving them.
        router: a fitted Router for ``model="auto"`` (None: "auto" is refused).
        api_key: required as a Bearer token when set; also enables adapter loading.
        default_max_tokens: a reply's length when the request sets no max_tokens; None (the
            default) is vLLM's rule, the rest of the context.
        limits: what one request may cost (body size, characters, timeouts: bot.serve.limits).
    """

    backbone: object
    tasks: dict
    scheduler: Scheduler
    router: object | None = None
    api_key: str | None = None
    default_max_tokens: int | None = None
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    limits: Limits = field(default_factory=Limits)
    created: int = field(default_factory=lambda: int(time.time()))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.limits.check()
        self.scheduler.metrics = self.metrics
        self.metrics.watch(self.scheduler)

    @classmethod
    def build(cls, backbone, adapters_dir, *, api_key=None, precision="auto", max_batch=16,
              max_queue=64, max_len=2048, with_router=True, encoder=None,
              limits: Limits | None = None) -> ServerState:
        """Load every adapter in ``adapters_dir`` and start serving them."""
        tasks, failures = load_all(backbone, adapters_dir)
        for name, err in failures.items():
            log.warning("adapter %s not served: %s", name, err)
        router = None
        if with_router and tasks:
            router = build_router([t.spec for t in tasks.values()], encoder, backbone=backbone)
        scheduler = scheduler_for(backbone, tasks, precision=precision, max_batch=max_batch,
                                  max_queue=max_queue, max_len=max_len)
        return cls(backbone, tasks, scheduler, router, api_key, limits=limits or Limits())

    # -------------------------------------------------------------- models
    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    @property
    def base_name(self) -> str:
        return self.backbone.info.name

    def model_ids(self) -> list[str]:
        bases = [n for n in self.tasks if self.is_base(n)]
        return [self.base_name, *bases, *self.scheduler.generators, *sorted(self.scheduler.classifiers),
                *(["auto"] if self.router is not None else [])]

    def known_labels(self) -> set[str]:
        """Model names /metrics may use as labels ("-": the request named none)."""
        return {"-", *self.model_ids()}

    def model_cards(self) -> list[dict]:
        def card(mid, parent=None, **extra):
            task = self.tasks.get(mid)
            root = str(task.spec.folder) if task is not None else mid
            return {"id": mid, "object": "model", "created": self.created, "owned_by": "bot",
                    "root": root, "parent": parent, **extra}
        cards = [card(self.base_name, root=self.backbone.info.source,
                      max_model_len=self.scheduler.max_len)]
        cards += [card(n, self.base_name, kind="base") for n in self.tasks if self.is_base(n)]
        cards += [card(n, self.base_name, kind="generate") for n in self.scheduler.generators]
        cards += [card(n, self.base_name, kind="classify",
                       labels=self.scheduler.classifiers[n].labels)
                  for n in sorted(self.scheduler.classifiers)]
        if self.router is not None:
            cards.append(card("auto", None, kind="router"))
        return cards

    @property
    def sampling_defaults(self) -> dict:
        """vLLM's rule: the model's generation_config decides what a request leaves out."""
        gc = self.backbone.base.generation_config
        if getattr(gc, "do_sample", False):
            return {"temperature": float(gc.temperature or 1.0), "top_p": float(gc.top_p or 1.0)}
        return {"temperature": 0.0, "top_p": 1.0}

    # ----------------------------------------------------------------- chat
    def plan_chat(self, model: str, messages: list[dict]) -> ChatPlan:
        """Decide who answers: the base model, an adapter, or the router's pick."""
        last = next((m["content"] for m in reversed(messages) if m["role"] == "user"),
                    messages[-1]["content"])
        route = None
        if model == "auto":
            with off_engine():  # the router's encoder runs in this handler thread
                route = self.router.route(last)
            if route.adapter == "help":
                return ChatPlan("help", reply=self.router.help_text(), route=route)
            last = route.text or last
            model = route.adapter if route.adapter in self.tasks else self.base_name
        if model == self.base_name or self.is_base(model):  # a base-kind route: no adapter
            return ChatPlan(None, route=route)
        if model in self.scheduler.generators:
            return ChatPlan(model, route=route)
        if is_mixture(model):
            return ChatPlan(mixture(self, model), route=route)
        if model in self.scheduler.classifiers:
            probs = self.scheduler.classify([last], [model])[0]
            task = self.scheduler.classifiers[model]
            return ChatPlan(model, reply=task.reply(probs), label_scores=probs, route=route)
        raise UnknownModel(f"model '{_shown(model)}' does not exist; available: {self.model_ids()}")

    def generation_adapter(self, model: str):
        """The engine's adapter for a request naming ``model`` outside chat (None = base).

        Raises:
            UnknownModel: nothing is served under that name (404).
            ServeError: the name is served but cannot generate text here (400).
        """
        if model == self.base_name or self.is_base(model):
            return None
        if model in self.scheduler.generators:
            return model
        if is_mixture(model):
            return mixture(self, model)
        if model in self.scheduler.classifiers:
            raise FieldError(f"'{_shown(model)}' is a classify adapter: it labels text and "
                             f"cannot continue it. Fix: POST /v1/classify, or name a generation "
                             f"model: {[self.base_name, *self.scheduler.generators]}",
                             param="model")
        if model == "auto":
            raise FieldError("model 'auto' routes chat turns (/v1/chat/completions). Fix: name "
                             f"a generation model: {[self.base_name, *self.scheduler.generators]}",
                             param="model")
        raise UnknownModel(f"model '{_shown(model)}' does not exist; available: "
                           f"{self.model_ids()}")

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Plain prompts (no chat template) as token ids. Blocking: call it from a worker."""
        return [list(ids) for ids in self.tokenizer(texts)["input_ids"]]

    def prepare_chat(self, model: str, messages: list[dict]) -> tuple[ChatPlan, list[int] | None]:
        """:meth:`plan_chat` and, when the reply is to be generated, the prompt's token ids.

        Blocking (routing, maybe a classification, the chat template): the HTTP layer calls
        it from a worker thread.
        """
        plan = self.plan_chat(model, messages)
        if plan.reply is not None:
            return plan, None
        return plan, self.prompt_ids(plan.adapter, messages)

    def classify(self, model: str, texts: list[str], cancelled=None) -> tuple[list[dict], int]:
        """Label probabilities of ``texts`` by classify adapter ``model``, and their prompt tokens.

        ``texts`` may be raw or already templated (as vLLM's /classify wants). Blocking;
        ``cancelled()`` turning true (the client left) drops the work at the engine's next slice.
        """
        task = self.scheduler.classifiers[model]
        texts = [_untemplated(task.spec.template, t) for t in texts]
        probs = self.scheduler.classify(texts, [model] * len(texts), cancelled=cancelled)
        tokens = sum(len(ids) for ids in self.tokenizer(texts)["input_ids"])
        return probs, tokens

    def is_base(self, model: str) -> bool:
        task = self.tasks.get(model)
        return task is not None and task.kind == "base"

    def prompt_ids(self, adapter: str | None, messages: list[dict]) -> list[int]:
        """The chat template applied to ``messages`` (plus the adapter's system prompt)."""
        task = self.tasks.get(adapter) if adapter else None
        system = getattr(task, "spec", None) and task.spec.template
        if system and system != "{text}" and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 return_dict=True)
        return list(out["input_ids"])

    # ------------------------------------------------------------- adapters
    def check_new_name(self, name: str) -> None:
        """Raise BotError unless ``name`` is a valid adapter name not served yet."""
        check_adapter_name(name, "lora_name")
        if name in self.tasks or name in self.scheduler.generators or \
                name in self.scheduler.classifiers or name in (self.base_name, "auto"):
            raise AdapterError(f"an adapter named '{name}' is already loaded. Fix: unload it "
                               "first (/v1/unload_lora_adapter) or pick another name")

    def load_adapter(self, name: str, folder: Path) -> str:
        """Load ``folder`` as ``name`` while requests keep running; returns its kind.

        Name and kind are checked before anything is registered, and a load that fails
        half way is undone, so a refused adapter is not listed and answers nothing.
        """
        self.check_new_name(name)
        if not folder.is_dir():
            raise AdapterError(f"{folder} is not an adapter folder")
        with self._lock:
            self.check_new_name(name)  # again: another load may have taken it meanwhile
            spec = None
            if (folder / "adapter.yaml").exists():
                spec = AdapterSpec.from_dir(folder)
                if spec.kind not in ("classify", "generate"):
                    raise AdapterError(
                        f"{folder / 'adapter.yaml'}: key 'kind' is {spec.kind!r}; only 'classify' "
                        "and 'generate' adapters can be loaded (the base model is served "
                        f"already as '{self.base_name}'). Fix: load a trained adapter folder")
                spec.name = name
            loaded = False
            try:
                if spec is not None:
                    task = load_task(self.backbone, spec)  # checks the backbone fingerprint
                else:  # a plain peft folder (e.g. written for vLLM): generation, shape-checked
                    self.backbone.load_adapter(name, folder)
                    task = None
                loaded = True
                self.scheduler.add_adapter(name, task)
            except BaseException:
                if loaded:
                    self._forget(name)
                raise
            if task is not None:
                self.tasks[name] = task
            return task.kind if task is not None else "generate"

    def _forget(self, name: str) -> None:
        """Undo a half-done load: nothing of ``name`` stays in the engine or on the backbone."""
        try:
            self.scheduler.remove_adapter(name)
        except Exception:  # noqa: BLE001 (it was never added; the backbone still has it)
            log.debug("adapter %s was not in the engine", name, exc_info=True)
        self.tasks.pop(name, None)
        self.backbone.drop_adapter(name)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            self.scheduler.remove_adapter(name)
            self.tasks.pop(name, None)
            self.backbone.drop_adapter(name)


def mixture(state: ServerState, model: str) -> Mixture:
    """``model`` read as a mixture of generation adapters (``a:0.7+b:0.3``, docs/api.md).

    Raises:
        FieldError: it does not parse, or names something that cannot be mixed (400).
        UnknownModel: it names an adapter that is not served (404).
    """
    try:
        mix = Mixture.parse(model)
    except ValueError as err:
        raise FieldError(f"model '{_shown(model)}' is not a valid adapter mixture: {err}. "
                         "Fix: write it as NAME:WEIGHT+NAME:WEIGHT, e.g. 'chat:0.7+mine:0.3'",
                         "model") from None
    served = state.scheduler.generators
    for name in mix.names:
        if name in served:
            continue
        if name in state.scheduler.classifiers or name == state.base_name or state.is_base(name):
            raise FieldError(f"model '{_shown(model)}': '{_shown(name)}' cannot be mixed; a "
                             f"mixture weighs generation adapters: {served}", "model")
        raise UnknownModel(f"model '{_shown(model)}' names '{_shown(name)}', which is not served; "
                           f"generation adapters: {served}")
    return mix


def is_mixture(model: str) -> bool:
    """Adapter names hold no ':' or '+' (bot.manifests.spec), so either one marks a mixture."""
    return ":" in model or "+" in model


def adapter_name(adapter) -> str | None:
    """How an engine adapter (a name, a mixture or None for the base model) is shown to clients."""
    return adapter if adapter is None or isinstance(adapter, str) else str(adapter)


def _shown(name: str, n: int = 60) -> str:
    """A client's string in a message: at most ``n`` characters (it may be megabytes)."""
    return name if len(name) <= n else f"{name[:n]}... ({len(name):,} characters)"


def _untemplated(template: str, text: str) -> str:
    """Accept raw text or, as vLLM's /classify needs, text with the adapter's template applied.

    A client written for vLLM sends the template filled in; the same request to bot serve
    must not get the template twice.
    """
    head, _, tail = template.partition("{text}")
    if (head or tail) and text.startswith(head) and text.endswith(tail) \
            and len(text) >= len(head) + len(tail):
        return text[len(head):len(text) - len(tail)]
    return text


def scheduler_for(backbone, tasks: dict, **kwargs) -> Scheduler:
    """A Scheduler serving every generate task (engine) and classify task (jobs) in ``tasks``."""
    classifiers = {n: t for n, t in tasks.items() if t.kind == "classify"}
    generators = [n for n, t in tasks.items() if t.kind == "generate"]
    return Scheduler(backbone, classifiers, generators, **kwargs)
