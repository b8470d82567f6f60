"""Choose the router head's settings on the VALIDATION splits only (issue 11).

Usage: python scripts/router_select.py [ADAPTERS_DIR] [--int8] [--sample N[,N...] [--grid]]

``--sample`` compares training-text samples per route (ROUTE_TRAIN_SAMPLE by default) with the
head's current settings (build.HEAD_NGRAMS, HEAD_EMBEDDING_WEIGHT, fitting.HEAD_C); with
``--grid``, every setting in GRID at each sample.

Builds each route's texts exactly as ``build_router`` does (route examples + ROUTE_TRAIN_SAMPLE
training texts), fits the head for every setting in GRID and prints its accuracy (argmax, no
fallback thresholds) on up to VAL_PER_ROUTE validation turns per route. The test splits and the
hand-written turns are never read: ``bot eval --only router`` measures those, once, afterwards.
"""

import random
import sys
import time

import numpy as np

from bot.manifests.spec import discover
from bot.routing import fitting
from bot.routing.build import (
    HEAD_EMBEDDING_WEIGHT,
    HEAD_NGRAMS,
    ROUTE_TRAIN_SAMPLE,
)
from bot.routing.cache import Embedder
from bot.routing.encoder import load_encoder
from bot.routing.route_data import spec_splits, turn_texts
from bot.util.text import normalise

VAL_PER_ROUTE = 1000
# (word vocabulary, char vocabulary, embedding weight, C); (0, 0, 1, 10) is the head before issue 11.
GRID = [(0, 0, 1.0, 10.0), (0, 0, 1.0, 30.0), (20000, 0, 2.0, 10.0), (0, 30000, 2.0, 10.0),
        (20000, 30000, 1.0, 10.0), (20000, 30000, 2.0, 10.0), (20000, 30000, 2.0, 30.0),
        (20000, 30000, 4.0, 10.0), (20000, 30000, 1.0, 30.0), (40000, 60000, 1.0, 10.0)]


def fitting_texts(specs, sample: int) -> dict[str, list[str]]:
    """Each route's fitting texts as build_router draws them, with ``sample`` training rows."""
    out = {}
    for spec in specs:
        rng = random.Random(spec.train.seed)
        out[spec.name] = list(spec.route_examples) + turn_texts(spec_splits(spec).train, rng, sample)
    return out


def main(argv: list[str]) -> None:
    args = [a for a in argv if not a.startswith("--")]
    samples = [ROUTE_TRAIN_SAMPLE]
    if "--sample" in argv:
        samples = [int(n) for n in argv[argv.index("--sample") + 1].split(",")]
        args = [a for a in args if a != argv[argv.index("--sample") + 1]]
    specs = discover(args[0] if args else "adapters")
    embedder = Embedder(load_encoder(int8="--int8" in argv))
    drawn = {n: fitting_texts(specs, n) for n in samples}
    val = {spec.name: turn_texts(spec_splits(spec).val, random.Random(spec.train.seed + 1), VAL_PER_ROUTE)
           for spec in specs}
    seen = {normalise(t) for examples in drawn.values() for texts in examples.values() for t in texts}
    val = {name: [t for t in texts if normalise(t) not in seen] for name, texts in val.items()}
    t0 = time.perf_counter()
    unique = sorted({t for examples in drawn.values() for texts in examples.values() for t in texts})
    vector_of = dict(zip(unique, embedder.encode(unique)))
    texts = [t for name in val for t in val[name]]
    labels = np.array([name for name in val for _ in val[name]])
    vectors = embedder.encode(texts)
    print(f"encoder {embedder.encoder.name_hint}: {len(unique)} route texts, "
          f"{len(texts)} validation turns embedded in {time.perf_counter() - t0:.0f} s")
    routes = list(val)
    settings = GRID if "--sample" not in argv or "--grid" in argv else [
        (*HEAD_NGRAMS, HEAD_EMBEDDING_WEIGHT, fitting.HEAD_C)]
    for n, examples in drawn.items():
        embeddings = {name: np.stack([vector_of[t] for t in texts]) for name, texts in examples.items()}
        for word, char, weight, c in settings:
            fitting.HEAD_C = c
            head = fitting.fit_route_head(embeddings, examples, word, char, embedding_weight=weight)
            predicted = np.array(routes)[fitting.head_scores(vectors, head, texts).argmax(axis=1)]
            per_route = " ".join(f"{r} {100 * (predicted[labels == r] == r).mean():.1f}" for r in routes)
            print(f"sample {n:>5} word {word:>5} char {char:>5} emb x{weight} C {c:>4}: validation "
                  f"{100 * (predicted == labels).mean():.1f} % | {per_route}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
