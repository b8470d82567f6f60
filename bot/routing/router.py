"""Router: choose which adapter answers a chat turn, and say why.

Each route (adapter) is described by a handful of example turns. A turn is embedded once with a
sentence encoder and compared with every example; ``bot.routing.fitting`` explains the scores.
``fit`` learns the calibration, the fallback thresholds (one per route) and the follow-up
``margin`` on held-out labelled turns; ``fit(..., head=True)`` also trains a linear head on the
routes' examples and scores with it. Before ``fit`` the score is the clipped cosine similarity,
the threshold is 0 (never fall back) and the margin is ``DEFAULT_MARGIN``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bot.errors import DataError
from bot.manifests.spec import check_adapter_name
from bot.routing import fitting, store
from bot.routing.cache import Embedder
from bot.routing.commands import HELP, help_lines, parse_command, scoring_text, split_follow_up
from bot.routing.turns import as_pairs
from bot.util.text import MAX_CHARS, normalise

DEFAULT_MARGIN = 0.1  # cosine units; only used until fit() replaces it


@dataclass(frozen=True)
class RouteChoice:
    """The router's decision for one turn."""

    adapter: str
    score: float
    runner_up: str | None
    runner_up_score: float
    scores: dict[str, float]
    reason: str
    fallback: bool = False
    override: bool = False
    text: str = ""


def _check_route_name(name: str, role: str) -> None:
    """The one adapter-name rule (bot.manifests.spec); it also reserves /help and 'auto'."""
    check_adapter_name(name, role)


def _ranked(scores: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(scores.items(), key=lambda item: -item[1])


def _score_of(name: str, scores: dict[str, float]) -> float:
    """A route's score; for a fallback without examples, 1 - best (no route applies)."""
    if name in scores:
        return scores[name]
    return round(1.0 - max(scores.values(), default=0.0), 4)


def _checked_heldout(pairs: list[tuple[str, str]], names: list[str], examples: dict) -> list:
    """``pairs`` when they can fit the router; a DataError naming the problem otherwise."""
    if not pairs or not examples:
        raise DataError("fit() needs routes (add_route) and at least one held-out turn")
    unknown = sorted({label for _, label in pairs} - set(names))
    if unknown:
        raise DataError(f"labels {unknown} are not adapters of this router ({names}); "
                        f"add_route() them first or relabel the turns")
    seen = {normalise(e) for ex in examples.values() for e in ex}
    leaked = [t for t, _ in pairs if normalise(t) in seen]
    if leaked:
        raise DataError(f"{len(leaked)} held-out turns are also route examples, e.g. "
                        f"{leaked[0][:60]!r}; hold out turns the routes have not seen")
    return pairs


class _RouterQuality:
    """Fitting the router's thresholds on held-out turns, and scoring it on labelled turns."""

    def fit(self, heldout, head: bool = False, ngrams: tuple[int, int] = (0, 0), **head_options) -> dict:
        """Fit calibration, thresholds and follow-up margin on held-out labelled turns.

        ``heldout`` must not repeat route examples. Returns the fitted values and the (optimistic)
        accuracy on ``heldout``. ``head``: also train a linear head on the route examples (worth
        it with hundreds per route), over the embeddings and ``ngrams`` = (word, char) TF-IDF
        vocabulary sizes (bot.routing.features; (0, 0) for none); ``head_options`` go to
        fitting.fit_route_head (``embedding_weight``, ``written``, ``written_weight``).
        """
        pairs = _checked_heldout(as_pairs(heldout), self.names, self._examples)
        labels = np.array([label for _, label in pairs])
        texts = [scoring_text(t) for t, _ in pairs]
        vectors = self.embedder.encode(texts)
        self.head = None
        self.calibration = fitting.fit_calibration(self._similarities(vectors), labels, self.routes)
        if head:
            self.head = fitting.fit_route_head(self._embeddings, self._examples, *ngrams, **head_options)
        scores = self._score_matrix(vectors, texts)
        self.threshold = fitting.fit_threshold(scores, labels, self.routes, self.fallback)
        cuts = fitting.fit_route_thresholds(scores, labels, self.routes, self.fallback, self.threshold)
        self.thresholds = dict(zip(self.routes, cuts, strict=True))
        self.margin = fitting.fit_margin(scores, labels, self.routes, cuts, self.margin)
        predicted = fitting.predict(scores, self.routes, cuts, self.fallback)
        return {**fitting.fitted_values(self.threshold, self.margin, self.calibration,
                                        self.thresholds), "head": self.head is not None,
                "per_adapter_k": self.per_adapter_k, "n": int(len(labels)),
                "accuracy": round(float((predicted == labels).mean()), 4)}

    def evaluate(self, labelled) -> dict:
        """Route each turn on its own; the ``bot.eval.metrics.router_metrics`` of the result."""
        from bot.eval.metrics import router_metrics  # lazy: bot.eval.metrics imports sklearn

        pairs = as_pairs(labelled)
        if not pairs:
            raise DataError("evaluate() needs at least one labelled turn")
        predictions: list[RouteChoice] = []
        for start in range(0, len(pairs), 256):
            self.prime([t for t, _ in pairs[start:start + 256]])
            predictions += [self.route(t) for t, _ in pairs[start:start + 256]]
        return router_metrics([label for _, label in pairs], [c.adapter for c in predictions],
                              [c.fallback for c in predictions], labels=self.names,
                              texts=[t for t, _ in pairs])


class Router(_RouterQuality):
    """Route chat turns to adapters by similarity to example turns.

    Args:
        encoder: needs ``encode(list[str], normalize_embeddings=True) -> array``.
        fallback: the adapter for turns no route fits (it needs no examples).
        per_adapter_k: similarities averaged per route.
        max_chars: text is cut to this many characters before it is embedded.
    """

    def __init__(self, encoder, fallback: str = "chat", per_adapter_k: int = 3,
                 threshold: float = 0.0, margin: float = DEFAULT_MARGIN,
                 cache_size: int = 1024, max_chars: int = MAX_CHARS):
        _check_route_name(fallback, "router fallback")
        if per_adapter_k < 1:
            raise DataError(f"per_adapter_k must be at least 1, got {per_adapter_k}")
        self.embedder = Embedder(encoder, max_chars, cache_size)
        self.fallback = fallback
        self.per_adapter_k = int(per_adapter_k)
        self.threshold = float(threshold)
        self.margin = float(margin)
        self.calibration: tuple[float, float, float] | None = None  # (w_sim, w_lead, bias)
        self.thresholds: dict[str, float] = {}  # per route; a route not here uses ``threshold``
        self.head: dict | None = None  # fitting.fit_route_head's dict once fit(head=True)
        self.describe: dict[str, str] = {}
        self._examples: dict[str, list[str]] = {}
        self._embeddings: dict[str, np.ndarray] = {}
        self.second = None  # bot.routing.second.SecondStage when attached (second.attach)
        # set by build_router: cache_path (its cache folder), second_note and second_check
        # (what second.attach decided, and on what figures), abstain (bot.routing.abstain)
        self.cache_path = self.second_check = self.abstain = None
        self.second_note = ""

    @property
    def encoder(self):
        return self.embedder.encoder

    @property
    def max_chars(self) -> int:
        return self.embedder.max_chars

    # ----- routes -------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Every adapter the router can choose: the routes, then the fallback."""
        names = list(self._examples)
        return names if self.fallback in names else names + [self.fallback]

    @property
    def routes(self) -> list[str]:
        """Adapters that have example turns (the fallback may or may not be one)."""
        return list(self._examples)

    @property
    def examples(self) -> dict[str, list[str]]:
        """Each route's example turns (a copy)."""
        return {name: list(texts) for name, texts in self._examples.items()}

    def add_route(self, name: str, examples: list[str], description: str | None = None) -> None:
        """Add (or replace) a route from example turns; it is scored at once, without refitting."""
        _check_route_name(name, "router route")
        examples = [str(e) for e in examples if str(e).strip()]
        if not examples:
            raise DataError(f"route '{name}' needs at least one non-empty example")
        self._embeddings[name] = self.embedder.encode(examples, progress=f"router: embed '{name}' examples")
        self._examples[name] = examples
        if self.head is not None:  # the head knows only the routes it was fitted on
            self.head, self.thresholds = None, {}
        if description is not None:
            self.describe[name] = description

    def prime(self, texts: list[str]) -> None:  # embed in batches ahead of route(): evaluation
        self.embedder.prime([scoring_text(str(t)) for t in texts])

    def clear_cache(self) -> None:  # forget cached turn embeddings (for timing cold routing)
        self.embedder.clear()

    def help_text(self) -> str:
        """One line per command, with the descriptions from ``describe``."""
        return help_lines(self.names, {n: len(e) for n, e in self._examples.items()}, self.describe)

    # ----- scoring --------------------------------------------------------------------------

    def _similarities(self, vectors: np.ndarray) -> np.ndarray:
        return fitting.top_k_similarity(vectors, list(self._embeddings.values()), self.per_adapter_k)

    def _score_matrix(self, vectors: np.ndarray, texts: list[str]) -> np.ndarray:
        """Scores (n_turns, n_routes): the head's probabilities (it also reads the ``texts``'
        n-grams), else calibrated similarities."""
        if self.head is not None:
            return fitting.head_scores(vectors, self.head, [t[: self.max_chars] for t in texts])
        return fitting.calibrate(self._similarities(vectors), self.calibration)

    def _scores(self, text: str) -> dict[str, float]:
        """Score of every route for one turn."""
        if not self._examples:
            return {}
        row = self._score_matrix(self.embedder.embed_one(text)[None, :], [text])[0]
        return {name: round(float(s), 4) for name, s in zip(self._examples, row, strict=True)}

    def cut(self, name: str) -> float:
        return self.thresholds.get(name, self.threshold)  # route ``name``'s fallback threshold

    # ----- routing --------------------------------------------------------------------------

    def route(self, text: str, previous: str | None = None) -> RouteChoice:
        """Choose the adapter for ``text``; ``previous`` is the adapter of the last turn."""
        text = "" if text is None else str(text)
        command = parse_command(text)
        if command:
            return self._command(*command, text)
        marker, rest = split_follow_up(text)
        sticky = bool(marker) and previous in self.names
        if sticky and not rest.strip():
            return self._stay(previous, {}, "nothing new to score", text)
        scoring = scoring_text(text)
        scores = self._scores(scoring)
        scores, asked = self.second.consult(scores, scoring) if self.second else (scores, "")
        return self._choose(scores, text, previous if sticky else None, asked)

    def route_all(self, texts: list[str]) -> list[RouteChoice]:
        """``route(t)`` for each turn on its own (no previous turn), batched (see _route_all)."""
        return _route_all(self, ["" if t is None else str(t) for t in texts])

    def _choose(self, scores: dict[str, float], text: str, previous: str | None,
                asked: str) -> RouteChoice:
        """The decision from the turn's scores (``previous``: a follow-up's earlier adapter)."""
        choice = self._follow_up(previous, scores, text) if previous else self._decide(scores, text)
        choice = replace(choice, reason=f"{choice.reason}; {asked}") if asked else choice
        if not choice.scores or self.fallback in choice.scores:
            return choice
        # Report the example-less fallback too, so ``scores`` covers every adapter.
        return replace(choice, scores={**choice.scores,
                                       self.fallback: _score_of(self.fallback, choice.scores)})

    def _command(self, name: str, rest: str, text: str) -> RouteChoice:
        """``/help``, ``/<adapter> text`` or an unknown ``/foo``."""
        # Commands are typed by hand: "/Sentiment" means the same as "/sentiment".
        name = next((n for n in self.names if n.lower() == name.lower()), name)
        if name.lower() == HELP:
            return RouteChoice(HELP, 1.0, None, 0.0, {HELP: 1.0}, "override /help",
                               override=True, text=self.help_text())
        if name in self.names:
            scores = {n: (1.0 if n == name else 0.0) for n in self.names}
            return RouteChoice(name, 1.0, None, 0.0, scores, f"override /{name}",
                               override=True, text=rest.strip())
        known = ", ".join(f"/{n}" for n in [*self.names, HELP])
        return RouteChoice(self.fallback, 1.0, None, 0.0, {}, f"unknown command '/{name}' "
                           f"(known: {known}) -> fallback '{self.fallback}'",
                           fallback=True, text=text)

    def _decide(self, scores: dict[str, float], text: str) -> RouteChoice:
        """Best route if it clears the threshold, else the fallback."""
        ranked = _ranked(scores)
        if not ranked:
            return RouteChoice(self.fallback, 1.0, None, 0.0, {}, f"no routes -> fallback "
                               f"'{self.fallback}'", fallback=True, text=text)
        best, best_score = ranked[0]
        if best_score < self.cut(best):
            return RouteChoice(self.fallback, round(1.0 - best_score, 4), best, best_score, scores,
                               f"no route fits: best '{best}' {best_score:.2f} is below threshold "
                               f"{self.cut(best):.2f} -> fallback '{self.fallback}'",
                               fallback=True, text=text)
        runner, runner_score = ranked[1] if len(ranked) > 1 else (None, 0.0)
        reason = f"best match '{best}' ({best_score:.2f}"
        reason += f", runner-up '{runner}' {runner_score:.2f})" if runner else ")"
        return RouteChoice(best, best_score, runner, runner_score, scores, reason, text=text)

    def _follow_up(self, previous: str, scores: dict[str, float], text: str) -> RouteChoice:
        """Stay with ``previous`` unless another route clears the threshold and leads by ``margin``."""
        best, best_score = _ranked(scores)[0] if scores else (previous, 0.0)
        kept = _score_of(previous, scores)
        lead = best_score - kept
        if best != previous and best_score >= self.cut(best) and lead >= self.margin:
            return RouteChoice(best, best_score, previous, kept, scores,
                               f"follow-up, but '{best}' beats '{previous}' by {lead:.2f} "
                               f">= margin {self.margin:.2f}", text=text)
        return self._stay(previous, scores, f"best '{best}' {best_score:.2f}", text)

    def _stay(self, previous: str, scores: dict[str, float], why: str, text: str) -> RouteChoice:
        others = [(n, s) for n, s in _ranked(scores) if n != previous]
        runner, runner_score = others[0] if others else (None, 0.0)
        return RouteChoice(previous, _score_of(previous, scores) if scores else 1.0, runner,
                           runner_score, scores, f"follow-up: stayed with '{previous}' ({why})",
                           text=text)

    # ----- persistence (fitting and evaluation: _RouterQuality) --------------------------------

    def save(self, path) -> Path:
        """Write ``router.json`` and ``routes.safetensors`` into the folder ``path``."""
        config = {"fallback": self.fallback, "per_adapter_k": self.per_adapter_k,
                  "threshold": self.threshold, "margin": self.margin, "calibration": self.calibration,
                  "thresholds": self.thresholds, "describe": self.describe, "examples": self._examples,
                  "max_chars": self.max_chars}
        head_config, head = store.head_to_disk(self.head)
        return store.write_router(path, config | head_config, self._embeddings,
                                  self.embedder.encode([store.PROBE])[0], head)

    @classmethod
    def load(cls, path, encoder) -> Router:
        """Read a folder written by ``save``; refuses another format or another encoder."""
        config, tensors = store.read_router(path)
        router = cls(encoder, fallback=config["fallback"], per_adapter_k=config["per_adapter_k"],
                     threshold=config["threshold"], margin=config["margin"],
                     max_chars=config.get("max_chars", MAX_CHARS))
        if not store.same_encoder(router.embedder.encode([store.PROBE])[0], tensors["probe"]):
            raise DataError(f"{path} was saved with a different encoder; load it with that "
                            f"encoder or rebuild the routes with add_route() and fit()")
        router.calibration = tuple(config["calibration"]) if config["calibration"] else None
        router.describe = dict(config["describe"])
        for name, examples in config["examples"].items():
            router._examples[name] = list(examples)
            router._embeddings[name] = tensors[f"route.{name}"]
        router.thresholds = {k: float(v) for k, v in config["thresholds"].items()}
        router.head = store.head_from_disk(config, tensors)
        return router


def _route_all(router: Router, texts: list[str]) -> list[RouteChoice]:
    """The turns are embedded together and the second stage reads the unsure ones in one batch:
    many times faster than one ``route`` call per turn, for evaluation and reports."""
    out: list[RouteChoice | None] = [None] * len(texts)
    todo = []
    for i, text in enumerate(texts):
        if parse_command(text):
            out[i] = router.route(text)
        else:
            todo.append(i)
    scoring = [scoring_text(texts[i]) for i in todo]
    rows: list[dict[str, float]] = [{} for _ in todo]
    names = router.routes
    if names and todo:
        matrix = np.concatenate([router._score_matrix(router.embedder.encode(scoring[k:k + 256]),
                                                      scoring[k:k + 256])
                                 for k in range(0, len(scoring), 256)])
        rows = [{n: round(float(v), 4) for n, v in zip(names, row, strict=True)} for row in matrix]
    mixed = router.second.consult_many(rows, scoring) if router.second else [(r, "") for r in rows]
    for i, (scores, asked) in zip(todo, mixed, strict=True):
        out[i] = router._choose(scores, texts[i], None, asked)
    return out
