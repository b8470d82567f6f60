"""``bot train-router``: train the router's second stage and fit when to ask it.

The stage (bot.routing.second) is a classify adapter whose labels are routes, trained into
``ADAPTERS_DIR/.router/``. Its data are every route's ``route_examples``, each in a few
spellings (they are the only texts written the way users type, and bot.manifests.data drops
exact repeats), and a sample of each route's *training* split. ``gate`` and ``weight`` are then
chosen on the validation splits plus the hand-written validation turns (``val_turns.jsonl``,
bot.routing.route_data) and written to ``stage.json`` with the figures behind them. The test
splits and the hand-written test turns are never read.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np

from bot.errors import BotError, DataError
from bot.manifests.registry import load_task
from bot.manifests.router_folder import NAME, STAGE_FILE, folder_of
from bot.manifests.spec import AdapterSpec, LoraSettings, TrainSettings, discover
from bot.routing import fitting
from bot.routing.build import build_router
from bot.routing.commands import scoring_text
from bot.routing.route_data import (
    TURN_VIEWS,
    pair_weights,
    spec_splits,
    turn_texts,
    validation_pairs,
)
from bot.routing.second import SecondStage, plain, spellings
from bot.training.train import train_adapter
from bot.util.fsutil import adapter_lock, atomic_write_text

log = logging.getLogger(__name__)

TEXTS_PER_ROUTE = 3000  # training-split texts per route in routes.csv (bot.manifests.data.split trains on 70 %)
GATES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01)  # 1.01: every turn gets the second opinion
WEIGHTS = (0.3, 0.5, 0.7)


def _texts(rows: list[dict], rng: random.Random, n_texts: int) -> list[str]:
    """About ``n_texts`` turn texts from ``rows`` (a row with views gives one text per view)."""
    per_row = 1 + len(set(rows[0].get("views", {})) & set(TURN_VIEWS)) if rows else 1
    return turn_texts(rows, rng, max(1, n_texts // per_row))


def write_training_file(specs, path: Path, per_route: int = TEXTS_PER_ROUTE) -> dict[str, int]:
    """``text,label`` CSV of the routes' examples and training texts; rows per route."""
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


def write_manifest(specs, folder: Path) -> Path:
    """Write the route adapter's ``routes.csv`` and ``adapter.yaml`` into ``folder``; return it."""
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


def fit_stage(router, stage: SecondStage, pairs) -> dict:
    """Choose ``gate`` and ``weight`` on ``pairs`` by the router's whole decision (with its
    fallback cuts); the most accurate wins, the lower gate (fewer adapter calls) on ties.
    Gate 0 (the first stage alone) wins unless the second opinion helps."""
    texts = [scoring_text(t) for t, _, _ in pairs]
    labels = np.array([a for _, a, _ in pairs])
    sources = np.array([s for _, _, s in pairs])
    routes, weights = router.routes, pair_weights(labels, sources)
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
            val = [{"text": t, "label": route} for t, route, _ in validation_pairs(specs, build_router(specs))]
            try:
                train_adapter(AdapterSpec.from_dir(staging), backbone, folder, command=command,
                              val_rows=val)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return _fit(specs, folder, backbone, command, fit_only)


def _fit(specs, folder: Path, backbone, command: str, fit_only: bool) -> dict:
    """The fitting half of :func:`train_router`: gate and weight into ``stage.json``."""
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
