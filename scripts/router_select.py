"""Choose the router head's settings on the VALIDATION splits only (issue 11).

Usage: python scripts/router_select.py [ADAPTERS_DIR] [--int8]

Builds each route's texts exactly as ``build_router`` does (route examples + ROUTE_TRAIN_SAMPLE
training texts), fits the head for every setting in GRID and prints its accuracy (argmax, no
fallback thresholds) on up to VAL_PER_ROUTE validation turns per route. The test splits and the
hand-written turns are never read: ``bot eval --only router`` measures those, once, afterwards.
"""

import random
import sys
import time

import numpy as np

from bot.routing import fitting
from bot.routing.build import ROUTE_TRAIN_SAMPLE, spec_splits, turn_texts
from bot.routing.cache import Embedder
from bot.routing.encoder import load_encoder
from bot.spec import discover
from bot.text import normalise

VAL_PER_ROUTE = 1000
# (word vocabulary, char vocabulary, embedding weight, C); (0, 0, 1, 10) is the head before issue 11.
GRID = [(0, 0, 1.0, 10.0), (0, 0, 1.0, 30.0), (20000, 0, 2.0, 10.0), (0, 30000, 2.0, 10.0),
        (20000, 30000, 1.0, 10.0), (20000, 30000, 2.0, 10.0), (20000, 30000, 2.0, 30.0),
        (20000, 30000, 4.0, 10.0)]


def main(argv: list[str]) -> None:
    args = [a for a in argv if not a.startswith("--")]
    specs = discover(args[0] if args else "adapters")
    embedder = Embedder(load_encoder(int8="--int8" in argv))
    examples, val = {}, {}
    for spec in specs:
        rng = random.Random(spec.train.seed)
        parts = spec_splits(spec)
        examples[spec.name] = list(spec.route_examples) + turn_texts(parts.train, rng, ROUTE_TRAIN_SAMPLE)
        val[spec.name] = turn_texts(parts.val, random.Random(spec.train.seed + 1), VAL_PER_ROUTE)
    seen = {normalise(t) for texts in examples.values() for t in texts}
    val = {name: [t for t in texts if normalise(t) not in seen] for name, texts in val.items()}
    t0 = time.perf_counter()
    embeddings = {name: embedder.encode(texts) for name, texts in examples.items()}
    texts = [t for name in val for t in val[name]]
    labels = np.array([name for name in val for _ in val[name]])
    vectors = embedder.encode(texts)
    print(f"encoder {embedder.encoder.name_hint}: {sum(map(len, examples.values()))} route texts, "
          f"{len(texts)} validation turns embedded in {time.perf_counter() - t0:.0f} s")
    routes = list(examples)
    for word, char, weight, c in GRID:
        fitting.HEAD_C = c
        head = fitting.fit_route_head(embeddings, examples, word, char, embedding_weight=weight)
        predicted = np.array(routes)[fitting.head_scores(vectors, head, texts).argmax(axis=1)]
        per_route = " ".join(f"{r} {100 * (predicted[labels == r] == r).mean():.1f}" for r in routes)
        print(f"word {word:>5} char {char:>5} emb x{weight} C {c:>4}: validation "
              f"{100 * (predicted == labels).mean():.1f} % | {per_route}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
