"""Build a fitted Router from the adapter manifests in ``adapters/``.

Each adapter's route is its ``route_examples`` plus a sample of its *training* texts;
thresholds are fitted on its *validation* split; ``bot eval`` scores the router on the
*test* splits plus the hand-written turns (``bot.routing.turns``). The three sets never
overlap (bot.manifests.data.split). A fitted router is cached under ``$BOT_CACHE`` keyed by everything
that shapes it, so a new adapter folder is picked up with no code change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

from bot.errors import BotError
from bot.routing import abstain
from bot.routing.encoder import load_encoder
from bot.routing.route_data import route_texts, spec_splits, turn_texts
from bot.routing.router import Router
from bot.routing.second import attach
from bot.util.assets import cache_dir
from bot.util.text import normalise

log = logging.getLogger(__name__)

# Training texts per route: each one costs an embedding when the router is first built. More
# helped on the validation splits and not beyond them (scripts/router_select.py --sample, int8
# encoder, 2026-11-29): 1,500 / 3,000 / 6,000 / 12,000 / 20,000 per route gave 94.8 / 95.8 /
# 96.5 / 96.4 / 96.2 % argmax accuracy on validation, but held out 6,000 scored 94.1 % like
# 1,500: +8 points on VADER test snippets, -7 on the hand-written assistant requests and -3 to
# -6 on the other hand-written turns. The router fits the data sets' styles more closely, and
# people do not type like them, so 1,500 stays.
ROUTE_TRAIN_SAMPLE = 1500
FIT_SAMPLE = 300
HEAD_MIN_EXAMPLES = 100  # per route, for the linear head (fitting.fit_head)
# The head's n-gram TF-IDF features (word, char vocabulary sizes) and the embeddings' weight
# beside them, chosen by accuracy on the validation splits (issue 11; reports/eval.md).
HEAD_NGRAMS = (20000, 30000)
HEAD_EMBEDDING_WEIGHT = 1.0
# Each route example (the manifest's route_examples, written as people type) weighs this many
# data-set texts in the head. Chosen on validation (the validation splits, route-balanced, and
# the 100 hand-written turns of val_turns.jsonl; scratch run 2026-11-29, int8 encoder): weights
# 1 / 3 / 10 / 30 / 100 gave 95.9 / 95.9 / 95.8 / 95.8 / 95.7 % on the splits and 89 / 91 / 91 /
# 92 / 92 % on the hand-written turns.
ROUTE_EXAMPLE_WEIGHT = 30.0


def router_key(specs, encoder_name: str) -> str:
    blob = json.dumps([[s.name, s.kind, s.route_examples, s.data, s.route_data, s.train.seed,
                        s.description, s.route_description] for s in specs]
                      + [encoder_name, ROUTE_TRAIN_SAMPLE, FIT_SAMPLE, HEAD_MIN_EXAMPLES,
                         HEAD_NGRAMS, HEAD_EMBEDDING_WEIGHT, ROUTE_EXAMPLE_WEIGHT], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_fallback(specs) -> str:
    """Where turns that fit no route go: the bare-backbone (``base``) route, else ``chat``."""
    return next((s.name for s in specs if s.kind == "base"), "chat")


def build_router(specs, encoder=None, use_cache: bool = True, fallback: str | None = None,
                 backbone=None, adapters_dir=None) -> Router:
    """A Router over ``specs`` (AdapterSpec list), fitted on their validation splits.

    A cached router that cannot be read, has another format or another encoder is rebuilt.

    Args:
        fallback: the route for turns that fit none (None: ``default_fallback(specs)``).
        backbone: the loaded Backbone; with it, the router's second stage is attached from the
            specs' adapters folder when one fits these routes (bot.routing.second.attach).
        adapters_dir: where the second stage lives (None: the first spec's parent folder).

    The abstain threshold is fitted on validation last (bot.routing.abstain.attach).
    """
    router = _fitted_router(specs, encoder, use_cache, fallback)
    adapters_dir = adapters_dir or (specs[0].folder.parent if specs and specs[0].folder else None)
    if backbone is not None and adapters_dir is not None:
        attach(router, backbone, Path(adapters_dir), specs)
    abstain.attach(router, specs)
    return router


def _fitted_router(specs, encoder, use_cache: bool, fallback: str | None) -> Router:
    """The first stage: loaded from the cache, or built and fitted (then cached)."""
    fallback = fallback or default_fallback(specs)
    encoder = encoder or load_encoder()
    key = router_key(specs, getattr(encoder, "name_hint", "minilm") + f"|{fallback}")
    cached = cache_dir() / "router" / key
    if use_cache and (cached / "router.json").exists():
        try:
            router = Router.load(cached, encoder)
            _describe(router, specs)
            router.cache_path = cached
            return router
        except Exception as err:  # a stale, foreign or damaged cache is rebuilt, never fatal
            log.info("rebuilding the router cache: %s", err)
    router = Router(encoder, fallback=fallback, per_adapter_k=10)
    log.info("building the router over %s (first run with these routes: up to %d texts per "
             "route are embedded, a minute or two on 2 CPU cores; cached in %s)",
             ", ".join(s.name for s in specs), ROUTE_TRAIN_SAMPLE, cached)
    heldout = {}
    for spec in specs:
        rng = random.Random(spec.train.seed)
        try:
            parts = spec_splits(spec)
            corpus = turn_texts(parts.train, rng, ROUTE_TRAIN_SAMPLE)
            heldout[spec.name] = turn_texts(parts.val, rng, FIT_SAMPLE)
        except BotError:
            corpus = []  # data not available: route on the examples alone
        router.add_route(spec.name, list(spec.route_examples) + corpus)
    # Different BBC articles can share a headline, so a held-out headline may equal a
    # training one; such turns say nothing about generalisation and are left out.
    seen = route_texts(router)
    heldout = {name: [t for t in texts if normalise(t) not in seen] for name, texts in heldout.items()}
    if len(heldout) >= 2:
        # A linear head needs data behind every route; routes built from a few examples alone
        # are scored by similarity, which needs no training.
        enough = all(len(texts) >= HEAD_MIN_EXAMPLES for texts in router.examples.values())
        written = {spec.name: len([e for e in spec.route_examples if str(e).strip()]) for spec in specs}
        router.fit(heldout, head=enough, ngrams=HEAD_NGRAMS, embedding_weight=HEAD_EMBEDDING_WEIGHT,
                   written=written, written_weight=ROUTE_EXAMPLE_WEIGHT)
    _describe(router, specs)
    if use_cache:
        try:
            router.save(cached)
            router.cache_path = cached
        except OSError as err:
            log.warning("could not cache the router in %s (%s); it will be rebuilt next time",
                        cached, err)
    return router


def _describe(router, specs) -> None:
    for spec in specs:
        router.describe[spec.name] = spec.description or spec.kind


