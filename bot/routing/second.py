"""The router's second opinion: a classify adapter on the shared backbone whose labels are routes.

The first stage (bot.routing.router) embeds a turn with a small sentence encoder and reads it
with a linear head: about 5 ms, and right on about 94 % of held-out turns. Most of its misses
are between small talk and opinions ("tangled is my favourite film, so beautiful") and in the
data sets' own styles (VADER snippets, chitchat turns), which the backbone fine-tuned on the
routes' training texts reads better; on turns written the way people type, that adapter alone
is worse than the first stage. So it is a second opinion: when the first stage is unsure (its
best score below ``gate``), the route adapter runs on the backbone that is loaded anyway, and
the two probability vectors are averaged (``weight`` on the adapter's). Confident turns, most
of them, never pay for it, so the median routing time stays the first stage's.

The route adapter is trained by ``bot train-router`` into ``ADAPTERS_DIR/.router/``. Its data
are every route's ``route_examples``, each in a few spellings (they are the only texts written
the way users type, and bot.data drops exact repeats), and a sample of each route's *training*
split. ``gate`` and ``weight`` are then chosen on the validation splits plus the hand-written
validation turns (``val_turns.jsonl``) and written to ``stage.json`` with the figures behind
them. The test splits and the hand-written test turns are never read. When the routes change
(an adapter added or removed), the stage no longer matches and is switched off, with a log line
saying how to retrain it.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import random
import re
from pathlib import Path

import numpy as np

from ..errors import BotError

log = logging.getLogger(__name__)

FOLDER = ".router"  # under ADAPTERS_DIR; dot folders are not adapters (bot.spec.scan)
NAME = "router"
STAGE_FILE = "stage.json"
TEXTS_PER_ROUTE = 3000  # training-split texts per route in routes.csv (bot.data.split trains on 70 %)
VAL_PER_ROUTE = 1000
GATES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01)  # 1.01: every turn gets the second opinion
WEIGHTS = (0.3, 0.5, 0.7)
VAL_TURNS = Path(__file__).with_name("val_turns.jsonl")

_CONTRACTION = re.compile(r"(\w) (n't|'t|'s|'re|'ve|'ll|'d|'m)\b", re.IGNORECASE)
_BEFORE_PUNCT = re.compile(r"\s+([?!.,;:)]+)(?=\s|$)")  # "answers ?" but not " :D"
_QUOTES = re.compile(r"``|''")


def plain(text: str) -> str:
    """``text`` without the data sets' tokenisation quirks, as a person would type it.

    TREC writes "doesn 't" and "Why ?", the VADER snippets carry HTML entities ("&lt;3") and
    ``''quotes''``. A classifier trained on such texts learns the quirks as cues for their
    route, and people do not type them; the second stage reads every text through this, in
    training and in routing alike. Clean text comes back unchanged.
    """
    text = html.unescape(text)
    text = _QUOTES.sub('"', text)
    text = _CONTRACTION.sub(r"\1\2", text)
    text = _BEFORE_PUNCT.sub(r"\1", text)
    return " ".join(text.split())


def spellings(text: str) -> list[str]:
    """``text`` as people type it: as written, lower-case, without its final punctuation."""
    bare = text.rstrip(".!?")
    return list(dict.fromkeys(t for t in (text, text.lower(), bare, bare.lower()) if t.strip()))


def _texts(rows: list[dict], rng: random.Random, n_texts: int) -> list[str]:
    """About ``n_texts`` turn texts from ``rows`` (a row with views gives one text per view)."""
    from .build import TURN_VIEWS, turn_texts

    per_row = 1 + len(set(rows[0].get("views", {})) & set(TURN_VIEWS)) if rows else 1
    return turn_texts(rows, rng, max(1, n_texts // per_row))


def write_training_file(specs, path: Path, per_route: int = TEXTS_PER_ROUTE) -> dict[str, int]:
    """``text,label`` CSV of the routes' examples and training texts; rows per route."""
    from ..fsutil import atomic_write_text
    from .build import spec_splits

    counts, buffer = {}, io.StringIO(newline="")
    out = csv.writer(buffer)
    out.writerow(["text", "label"])
    for spec in specs:
        rng = random.Random(spec.train.seed)
        try:
            corpus = _texts(spec_splits(spec).train, rng, per_route)
        except BotError:
            corpus = []  # no data: the route's examples alone
        examples = [v for t in spec.route_examples for v in spellings(plain(t))]
        texts = [t for t in examples + [plain(t) for t in corpus] if t]
        out.writerows([t, spec.name] for t in texts)
        counts[spec.name] = len(texts)
    atomic_write_text(path, buffer.getvalue())
    return counts


def folder_of(adapters_dir) -> Path:
    """Where the route adapter of the routes under ``adapters_dir`` lives."""
    return Path(adapters_dir) / FOLDER / NAME


def write_manifest(specs, folder: Path) -> Path:
    """Write the route adapter's ``routes.csv`` and ``adapter.yaml`` into ``folder``; return it."""
    from ..spec import AdapterSpec, LoraSettings, TrainSettings

    counts = write_training_file(specs, folder / "routes.csv")
    log.info("route adapter data: %s", ", ".join(f"{n} {c}" for n, c in counts.items()))
    spec = AdapterSpec(
        name=NAME, kind="classify", labels=[s.name for s in specs],
        data={"path": "routes.csv", "text_col": "text", "label_col": "label"}, template="{text}",
        description="The router's second opinion: which route a turn belongs to (bot.routing.second).",
        lora=LoraSettings(layers=list(range(-16, 0))),
        # turns are at most 300 characters (build.turn_texts): 96 tokens hold nearly all
        train=TrainSettings(epochs=1.0, max_length=96, max_examples=None),
        route_examples=[], reply_template="**{label}** ({score:.2f})")
    spec.save(folder)
    return folder


class SecondStage:
    """The route adapter, loaded on the shared backbone, and when to ask it.

    Args:
        task: the loaded route adapter (a bot.tasks.classify.ClassifyTask).
        gate: the first stage's best score below which the adapter is asked (0: never).
        weight: the adapter's share of the averaged probabilities.
    """

    def __init__(self, task, gate: float, weight: float):
        self.task, self.gate, self.weight = task, float(gate), float(weight)
        self.labels = list(task.labels)
        self.asked = 0  # turns that got the second opinion (reports)

    def probs(self, texts: list[str]) -> np.ndarray:
        """The adapter's probabilities, shape (len(texts), len(labels))."""
        rows = self.task.predict([plain(t) for t in texts], batch_size=32)
        return np.array([[row[name] for name in self.labels] for row in rows], dtype=np.float32)

    def consult(self, scores: dict[str, float], text: str) -> tuple[dict[str, float], str]:
        """``scores`` averaged with the adapter's when the first stage is unsure, and why.

        Routes added since the adapter was trained (``Router.add_route``) switch it off: it
        would score a route it has never seen as 0."""
        if (not scores or max(scores.values()) >= self.gate or not text.strip()
                or sorted(scores) != sorted(self.labels)):
            return scores, ""
        self.asked += 1
        second = dict(zip(self.labels, self.probs([text])[0].tolist(), strict=True))
        mixed = {n: round((1 - self.weight) * s + self.weight * second.get(n, 0.0), 4)
                 for n, s in scores.items()}
        best = max(second, key=second.get)
        return mixed, (f"first stage unsure (best below {self.gate:.2f}): averaged with the route "
                       f"adapter, which says '{best}' {second[best]:.2f}")


def _read_stage(path: Path, router) -> tuple[dict, str]:
    """``stage.json`` and why it cannot be used for ``router`` ('' when it can)."""
    try:
        stage = json.loads(path.read_text(encoding="utf-8"))
        stage["gate"], stage["weight"] = float(stage["gate"]), float(stage["weight"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return {}, f"{path} is unreadable ({type(err).__name__}: {err})"
    if sorted(stage.get("routes") or []) != sorted(router.routes):
        return stage, f"it was fitted for the routes {stage.get('routes')}, the router has {router.routes}"
    if NAME in router.names:
        return stage, f"an adapter is named '{NAME}' too"
    if stage["gate"] <= 0.0:
        return stage, "it did not help on validation when it was fitted"
    return stage, ""


def attach(router, backbone, adapters_dir) -> SecondStage | None:
    """Load ``ADAPTERS_DIR/.router/router`` onto ``backbone`` as ``router.second``, if it fits.

    It fits when it was trained and fitted (``stage.json``) for exactly the router's routes and
    for this backbone; otherwise the router runs on its first stage alone, and the log says why.
    """
    from ..registry import load_task
    from ..spec import AdapterSpec

    folder = folder_of(adapters_dir)
    router.second = None
    if not (folder / STAGE_FILE).is_file():
        return None
    stage, why = _read_stage(folder / STAGE_FILE, router)
    if not why:
        try:
            task = load_task(backbone, AdapterSpec.from_dir(folder))
        except BotError as err:
            why = str(err)
    if why:
        log.info("router second stage off: %s. Fix: bot train-router", why)
        return None
    router.second = SecondStage(task, stage["gate"], stage["weight"])
    log.info("router second stage on: the route adapter is asked when the best score is below %.2f",
             router.second.gate)
    return router.second


def status(adapters_dir, routes: list[str]) -> str:
    """One line for ``bot list``: is there a second stage for ``routes``, and what it gained."""
    path = folder_of(adapters_dir) / STAGE_FILE
    if not path.is_file():
        return "none: the router uses its first stage alone (bot train-router adds one)"
    try:
        stage = json.loads(path.read_text(encoding="utf-8"))
        first, fitted = stage["first_stage"]["accuracy"], stage["routes"]
        line = (f"validation {100 * first:.1f} -> {100 * stage['accuracy']:.1f} %, asked when the first "
                f"stage's best score is below {stage['gate']:.2f} (fitted {stage.get('date', '?')})")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{path} is unreadable ({type(err).__name__}). Fix: bot train-router --fit-only"
    if sorted(fitted) != sorted(routes):
        return f"off: fitted for {fitted}, the adapters give {sorted(routes)}. Fix: bot train-router"
    return line if stage["gate"] > 0 else "off: it did not help on validation when it was fitted"


def attach_if_trained(router, adapters_dir, backbone_name: str | None = None) -> SecondStage | None:
    """:func:`attach`, loading a backbone first only when a fitted stage exists (reports)."""
    if not (folder_of(adapters_dir) / STAGE_FILE).is_file():
        return None
    from ..backbone import Backbone

    return attach(router, Backbone.load(backbone_name), adapters_dir)


HANDWRITTEN_SHARE = 0.25  # of the validation objective; the test set is ~19 % hand-written


def validation_pairs(specs, router) -> list[tuple[str, str, str]]:
    """(text, route, source) for fitting: validation splits and hand-written validation turns."""
    from ..text import normalise
    from .build import route_texts, spec_splits, turn_texts
    from .turns import load_turns

    seen, pairs = route_texts(router), []
    for spec in specs:
        try:
            rows = spec_splits(spec).val
        except BotError:
            continue
        drawn = turn_texts(rows, random.Random(spec.train.seed + 1), VAL_PER_ROUTE)
        pairs += [(t, spec.name, "data") for t in drawn if normalise(t) not in seen]
    pairs += [(t, a, "hand-written") for t, a in load_turns(VAL_TURNS) if a in router.routes]
    return pairs


def _weights(labels: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Every route's data-set turns weigh the same; hand-written turns HANDWRITTEN_SHARE in all."""
    weights = np.zeros(len(labels))
    data = sources == "data"
    share = HANDWRITTEN_SHARE if (~data).any() else 0.0
    routes = np.unique(labels[data])
    for route in routes:
        mine = data & (labels == route)
        weights[mine] = (1 - share) / (len(routes) * mine.sum())
    if share:
        weights[~data] = share / (~data).sum()
    return weights


def fit_stage(router, stage: SecondStage, pairs) -> dict:
    """Choose ``gate`` and ``weight`` on ``pairs`` by the router's whole decision (with its
    fallback cuts); the most accurate wins, the lower gate (fewer adapter calls) on ties.
    Gate 0 (the first stage alone) wins unless the second opinion helps."""
    from . import fitting
    from .commands import scoring_text

    texts = [scoring_text(t) for t, _, _ in pairs]
    labels = np.array([a for _, a, _ in pairs])
    sources = np.array([s for _, _, s in pairs])
    routes, weights = router.routes, _weights(labels, sources)
    first = router._score_matrix(router.embedder.encode(texts), texts)
    second = stage.probs(texts)[:, [stage.labels.index(r) for r in routes]]
    cuts = [router.cut(r) for r in routes]

    def score(gate: float, weight: float) -> dict:
        asked = first.max(axis=1) < gate
        mixed = np.where(asked[:, None], (1 - weight) * first + weight * second, first)
        hit = fitting.predict(mixed, routes, cuts, router.fallback) == labels
        return {"gate": gate, "weight": weight, "accuracy": round(float(weights @ hit), 4),
                **{f"accuracy_{s}": round(float(hit[sources == s].mean()), 4)
                   for s in ("data", "hand-written") if (sources == s).any()},
                "asked": round(float(asked.mean()), 4)}

    grid = [score(0.0, 0.0)] + [score(g, w) for g in GATES for w in WEIGHTS]
    best = max(grid, key=lambda r: (r["accuracy"], -r["gate"]))
    second_alone = np.array(routes)[second.argmax(axis=1)] == labels
    return {**best, "first_stage": grid[0], "adapter_alone": round(float(weights @ second_alone), 4),
            "n": len(pairs), "n_handwritten": int((sources == "hand-written").sum()), "grid": grid}


def train_router(adapters_dir, backbone, *, command: str = "", fit_only: bool = False) -> dict:
    """``bot train-router``: (re)train the route adapter for the routes in ``adapters_dir``,
    then fit its gate and weight on validation; returns what ``stage.json`` holds."""
    import shutil

    from ..errors import DataError
    from ..fsutil import adapter_lock
    from ..spec import AdapterSpec, discover
    from ..train import train_adapter

    specs = discover(adapters_dir)
    if len(specs) < 2:
        raise DataError(f"the router needs at least two adapters under {adapters_dir}, found "
                        f"{[s.name for s in specs]}. Fix: add adapters first (bot add)")
    folder = folder_of(adapters_dir)
    with adapter_lock(folder):
        if not fit_only:
            # The new manifest and data wait beside the trained adapter until training ends, so a
            # crash leaves the previous one whole (train_adapter swaps the folder in at the end).
            staging = folder.with_name(f".{NAME}.staging")
            shutil.rmtree(staging, ignore_errors=True)
            write_manifest(specs, staging)
            try:
                train_adapter(AdapterSpec.from_dir(staging), backbone, folder, command=command)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return _fit(specs, folder, backbone, command, fit_only)


def _fit(specs, folder: Path, backbone, command: str, fit_only: bool) -> dict:
    """The fitting half of :func:`train_router`: gate and weight into ``stage.json``."""
    import time

    from ..errors import DataError
    from ..fsutil import atomic_write_text
    from ..registry import load_task
    from ..spec import AdapterSpec
    from .build import build_router

    if fit_only and not (folder / "adapter_model.safetensors").is_file():
        raise DataError(f"{folder} holds no trained route adapter. Fix: bot train-router "
                        "without --fit-only")
    router = build_router(specs)
    spec = AdapterSpec.from_dir(folder)
    if sorted(spec.labels) != sorted(router.routes):
        raise DataError(f"{folder} was trained for the routes {spec.labels}, the adapters now give "
                        f"{router.routes}. Fix: bot train-router without --fit-only")
    task = load_task(backbone, spec)
    try:
        pairs = validation_pairs(specs, router)
        log.info("fitting the second stage on %d validation turns", len(pairs))
        result = fit_stage(router, SecondStage(task, 1.0, 0.5), pairs)
    finally:
        backbone.drop_adapter(NAME)
    result = {"routes": router.routes, **result, "command": command,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    atomic_write_text(folder / STAGE_FILE, json.dumps(result, indent=1) + "\n")
    return result
