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
import hashlib
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
        self.digest = ""  # of the stage.json it was read from (attach)
        # route sets it is asked for: its own, and one that extension_check found it helps
        self.route_sets = [sorted(self.labels)]

    def probs(self, texts: list[str]) -> np.ndarray:
        """The adapter's probabilities, shape (len(texts), len(labels))."""
        rows = self.task.predict([plain(t) for t in texts], batch_size=32)
        return np.array([[row[name] for name in self.labels] for row in rows], dtype=np.float32)

    def consult(self, scores: dict[str, float], text: str) -> tuple[dict[str, float], str]:
        """``scores`` averaged with the adapter's when the first stage is unsure, and why."""
        return self.consult_many([scores], [text])[0]

    def consult_many(self, scores: list[dict[str, float]], texts: list[str]) -> list[tuple[dict, str]]:
        """:meth:`consult` for many turns, the adapter run once over the unsure ones (batched)."""
        asked = [i for i, (s, t) in enumerate(zip(scores, texts, strict=True)) if self._asks(s, t)]
        out = [(s, "") for s in scores]
        if not asked:
            return out
        self.asked += len(asked)
        for i, row in zip(asked, self.probs([texts[i] for i in asked]), strict=True):
            out[i] = self._mixed(scores[i], dict(zip(self.labels, row.tolist(), strict=True)))
        return out

    def _asks(self, scores: dict[str, float], text: str) -> bool:
        """Unsure first stage, something to read, and a route set it is asked for (a route
        added at run time, ``Router.add_route``, was never checked: it stays quiet then)."""
        return (bool(scores) and max(scores.values()) < self.gate and bool(text.strip())
                and sorted(scores) in self.route_sets)

    def _mixed(self, scores: dict[str, float], second: dict[str, float]) -> tuple[dict, str]:
        """The averaged scores and the reason.

        For the routes it was fitted for: ``(1 - weight) * first + weight * adapter``. When the
        routes changed since (``bot add``, ``bot rm``), the adapter judges only among the routes
        it knows: it shares out the first stage's mass for those routes in its own proportions
        (its probabilities renormalised over them), and a route it never saw keeps the first
        stage's score. No retraining; the regression report of the change measures the result.
        """
        w = self.weight
        known = [n for n in scores if n in second]
        if sorted(known) == sorted(scores) == sorted(self.labels):
            mixed = {n: round((1 - w) * s + w * second[n], 4) for n, s in scores.items()}
            over = ""
        else:
            mass = sum(scores[n] for n in known)
            total = sum(second[n] for n in known) or 1.0
            mixed = {n: round((1 - w) * s + w * mass * second[n] / total, 4) if n in second else s
                     for n, s in scores.items()}
            over = f" over the {len(known)} routes it was trained on"
        best = max((n for n in known), key=second.get)
        share = second[best] / (sum(second[n] for n in known) or 1.0) if over else second[best]
        return mixed, (f"first stage unsure (best below {self.gate:.2f}): averaged with the route "
                       f"adapter{over}, which says '{best}' {share:.2f}")


def fitted_routes(folder: Path) -> list[str] | None:
    """The routes the stage in ``folder`` was fitted for (its ``stage.json``), or None."""
    try:
        routes = json.loads((Path(folder) / STAGE_FILE).read_text(encoding="utf-8"))["routes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [str(r) for r in routes] if isinstance(routes, list) else None


def _read_stage(path: Path, router) -> tuple[dict, str]:
    """``stage.json`` and why it cannot be used for ``router`` ('' when it can).

    Routes added or removed since it was fitted are fine while it still knows two of the
    router's routes (see ``SecondStage._mixed``); whether that helps is checked on validation
    (:func:`extension_check`)."""
    try:
        stage = json.loads(path.read_text(encoding="utf-8"))
        stage["gate"], stage["weight"] = float(stage["gate"]), float(stage["weight"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return {}, f"{path} is unreadable ({type(err).__name__}: {err})"
    if len(set(stage.get("routes") or []) & set(router.routes)) < 2:
        return stage, f"it was fitted for the routes {stage.get('routes')}, the router has {router.routes}"
    if NAME in router.names:
        return stage, f"an adapter is named '{NAME}' too"
    if stage["gate"] <= 0.0:
        return stage, "it did not help on validation when it was fitted"
    return stage, ""


def attach(router, backbone, adapters_dir, specs=None) -> SecondStage | None:
    """Load ``ADAPTERS_DIR/.router/router`` onto ``backbone`` as ``router.second``, if it fits.

    It fits when it was trained and fitted (``stage.json``) for the router's routes and for this
    backbone. When the routes changed since (an adapter added or removed), it is asked only
    about the routes it knows, and only if that beats the first stage alone on validation
    (:func:`extension_check`, cached beside the router). Otherwise the router runs on its
    first stage alone. ``router.second_note`` and the log say which, and why.

    Args:
        specs: the routes' manifests (for the validation turns); None: read from adapters_dir.
    """
    from ..registry import load_task
    from ..spec import AdapterSpec

    folder = folder_of(adapters_dir)
    router.second, router.second_note = None, "none: no route adapter fitted (bot train-router)"
    if not (folder / STAGE_FILE).is_file():
        return None
    stage, why = _read_stage(folder / STAGE_FILE, router)
    task = None
    if not why:
        try:
            task = load_task(backbone, AdapterSpec.from_dir(folder))
        except BotError as err:
            why = str(err)
    candidate = SecondStage(task, stage["gate"], stage["weight"]) if task is not None else None
    if candidate is not None:  # what a cached fit on the router's scores depends on (abstain)
        candidate.digest = hashlib.sha256((folder / STAGE_FILE).read_bytes()).hexdigest()[:16]
    if candidate is not None and sorted(stage["routes"]) != sorted(router.routes):
        check = extension_check(router, candidate, specs, adapters_dir, folder / STAGE_FILE)
        router.second_check = check
        if not check["on"]:
            why = (f"fitted for {sorted(stage['routes'])}, the router has {sorted(router.routes)}; asked "
                   f"only about the routes it knows it scored {100 * check['extended']:.1f} % on "
                   f"{check['n']} validation turns, the first stage alone {100 * check['first_stage']:.1f} %")
    if why:
        if task is not None:
            backbone.drop_adapter(NAME)
        log.info("router second stage off: %s. Fix: bot train-router", why)
        router.second_note = f"off: {why}"
        return None
    router.second = candidate
    if sorted(stage["routes"]) != sorted(router.routes):
        check = router.second_check
        candidate.route_sets.append(sorted(router.routes))
        router.second_note = (
            f"extended without retraining: fitted for {sorted(stage['routes'])}, it is asked only "
            f"about those routes; on {check['n']} validation turns of the routes now served, first "
            f"stage alone {100 * check['first_stage']:.1f} %, with it {100 * check['extended']:.1f} % "
            "(bot train-router refits it for every route)")
    else:
        router.second_note = f"on: asked when the first stage's best score is below {candidate.gate:.2f}"
    log.info("router second stage %s", router.second_note)
    return router.second


EXTENSION_VAL_PER_ROUTE = 300  # validation turns per route for extension_check (about a minute)


def extension_check(router, stage: SecondStage, specs, adapters_dir, stage_file: Path) -> dict:
    """Does the stage, fitted for other routes, help the router on validation? Cached.

    Both ways (first stage alone, and with the stage asked about the routes it knows) route the
    validation splits of the router's routes plus the hand-written validation turns; accuracy is
    weighted as in :func:`fit_stage`. The result is kept in the router's cache folder
    (``second.json``), keyed by the stage's ``stage.json``, so it is measured once per route set.
    """
    import time

    from ..fsutil import atomic_write_text
    from ..spec import discover

    digest = hashlib.sha256(stage_file.read_bytes()).hexdigest()[:16]
    cache = getattr(router, "cache_path", None)
    path = Path(cache) / "second.json" if cache else None
    if path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("stage") == digest and sorted(saved.get("routes", [])) == sorted(router.routes):
                return saved
        except (OSError, ValueError, AttributeError):
            pass
    specs = [s for s in (specs if specs is not None else discover(adapters_dir)) if s.name in router.routes]
    pairs = validation_pairs(specs, router, EXTENSION_VAL_PER_ROUTE)
    labels = np.array([a for _, a, _ in pairs])
    weights = _weights(labels, np.array([s for _, _, s in pairs]))
    texts = [t for t, _, _ in pairs]
    saved_second = router.second
    stage.route_sets.append(sorted(router.routes))  # asked about this route set, to measure it
    try:
        router.second = None
        alone = np.array([c.adapter for c in router.route_all(texts)]) == labels
        router.second = stage
        asked_before = stage.asked
        with_stage = np.array([c.adapter for c in router.route_all(texts)]) == labels
        asked = stage.asked - asked_before
    finally:
        router.second = saved_second
        stage.route_sets.pop()
    first, extended = float(weights @ alone), float(weights @ with_stage)
    result = {"stage": digest, "routes": router.routes, "n": len(pairs),
              "first_stage": round(first, 4), "extended": round(extended, 4),
              "asked": round(asked / max(len(pairs), 1), 4), "on": extended >= first,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    if path is not None:
        try:
            atomic_write_text(path, json.dumps(result, indent=1) + "\n")
        except OSError as err:
            log.info("could not cache the second stage check in %s: %s", path, err)
    return result


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
    if len(set(fitted) & set(routes)) < 2:
        return f"off: fitted for {fitted}, the adapters give {sorted(routes)}. Fix: bot train-router"
    if sorted(fitted) != sorted(routes):
        return (f"fitted for {sorted(fitted)}, the adapters give {sorted(routes)}: asked only about the "
                "routes it knows, if that beats the first stage on validation (checked when the router "
                "starts). Fix: bot train-router refits it for every route")
    return line if stage["gate"] > 0 else "off: it did not help on validation when it was fitted"


def attach_if_trained(router, adapters_dir, backbone_name: str | None = None) -> SecondStage | None:
    """:func:`attach`, loading a backbone first only when a fitted stage exists (reports)."""
    if not (folder_of(adapters_dir) / STAGE_FILE).is_file():
        return None
    from ..backbone import Backbone

    return attach(router, Backbone.load(backbone_name), adapters_dir)


HANDWRITTEN_SHARE = 0.25  # of the validation objective; the test set is ~19 % hand-written


def validation_pairs(specs, router, per_route: int = VAL_PER_ROUTE) -> list[tuple[str, str, str]]:
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
        drawn = turn_texts(rows, random.Random(spec.train.seed + 1), per_route)
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
            # routes.csv holds training-split texts only, so its own split leaves almost nothing
            # to validate on: training stops on the turns that fit the gate (never the test ones)
            from .build import build_router

            val = [{"text": t, "label": route} for t, route, _ in validation_pairs(specs, build_router(specs))]
            try:
                train_adapter(AdapterSpec.from_dir(staging), backbone, folder, command=command,
                              val_rows=val)
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
