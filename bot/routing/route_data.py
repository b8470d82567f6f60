"""The texts a router is built, fitted and scored on, drawn from the adapters' data.

* ``turn_texts``: what users would type for data rows (a prompt, a headline, a text's start);
* ``spec_splits``: a route's data split train / val / test (``route_data`` or ``data``);
* ``router_test_set``: the held-out test turns ``bot eval`` scores the router on;
* ``validation_pairs`` and ``pair_weights``: the validation turns the second stage and the
  abstain threshold are fitted on (bot.routing.second, bot.routing.abstain,
  bot.training.second_stage), with the hand-written validation turns (``val_turns.jsonl``).

Building (bot.routing.build), the second stage and its training all read these; none of them
imports another for its data.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from bot.errors import BotError
from bot.manifests.data import load_source, split
from bot.routing.turns import load_handwritten, load_turns
from bot.util.text import normalise

# Views of a row that stand for a user's turn. The BBC ``lede`` view (added after the router
# was tuned and measured) stays out, so the router's training texts and held-out turns are
# the ones its figures were measured on.
TURN_VIEWS = ("headline",)


def turn_texts(rows: list[dict], rng: random.Random, n: int) -> list[str]:
    """What users would type for these rows: a prompt, a headline, or a text's first 300 chars."""
    rows = rng.sample(rows, min(n, len(rows)))
    out = []
    for r in rows:
        if "prompt" in r:
            out.append(r["prompt"])
            continue
        out.append(r["text"][:300])
        out += [view for name, view in r.get("views", {}).items() if name in TURN_VIEWS]
    return out


def spec_splits(spec):
    """Splits of the route's data: ``route_data`` when the manifest has it, else ``data``."""
    source = spec.route_data or spec.data
    # A base route's own file holds prompt/reply rows, as a generate adapter's would.
    rows = load_source(source, "generate" if spec.kind == "base" else spec.kind, spec.folder)
    return split(rows, seed=spec.train.seed)


def route_texts(router) -> set[str]:
    """Every example text the router embeds, normalised (for overlap checks)."""
    return {normalise(t) for texts in router.examples.values() for t in texts}


def router_test_set(specs, per_adapter: int = 200, exclude: set[str] | None = None) -> list[tuple[str, str]]:
    """(text, adapter) pairs: test splits of every adapter + the hand-written chat turns.

    Args:
        exclude: normalised texts to leave out (the router's own examples).
    """
    pairs = []
    for spec in specs:
        rng = random.Random(spec.train.seed + 1)
        try:
            parts = spec_splits(spec)
        except BotError:
            continue
        pairs += [(t, spec.name) for t in turn_texts(parts.test, rng, per_adapter)]
    pairs += load_handwritten({s.name for s in specs})
    return [(t, a) for t, a in pairs if not exclude or normalise(t) not in exclude]


VAL_PER_ROUTE = 1000  # validation turns per route (data-set splits)
VAL_TURNS = Path(__file__).with_name("val_turns.jsonl")


HANDWRITTEN_SHARE = 0.25  # of the validation objective; the test set is ~19 % hand-written


def validation_pairs(specs, router, per_route: int = VAL_PER_ROUTE) -> list[tuple[str, str, str]]:
    """(text, route, source) for fitting: validation splits and hand-written validation turns."""
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


def pair_weights(labels: np.ndarray, sources: np.ndarray) -> np.ndarray:
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
