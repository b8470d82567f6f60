"""Pure functions that turn similarities, scores and labels into the router's fitted values.

* ``similarity``: per route, the mean of its ``per_adapter_k`` highest cosine similarities to
  the turn (top-k is less noisy than the single nearest example and less diluted than the mean);
* ``score``: that similarity calibrated into [0, 1] by a logistic model over two features that
  do not depend on which route it is: the similarity itself and its lead over the best other
  route. Because the features are route-agnostic, a route added later is scored without refitting;
* ``threshold``: the best score below which a turn falls back; then one threshold per route,
  fitted by coordinate ascent from that common one (a route whose near misses are usually
  right keeps a low cut, one that attracts stray turns gets a high one);
* ``margin``: how much another route must lead for a follow-up to switch away;
* ``head``: optionally, a linear classifier over the embeddings (and n-gram TF-IDF features of
  the text, bot.routing.features), trained on the routes' own example texts; its softmax replaces the calibrated similarity when every route has enough
  examples to learn from (``build_router``), and is dropped when a route is added later.

Arrays are (n_turns, n_routes) with columns in ``routes`` order; labels are adapter names.
"""

from __future__ import annotations

import numpy as np

from bot.routing.features import NgramFeatures

HEAD_C = 10.0  # inverse regularisation of the head; unit-length embeddings need little


def top_k_similarity(vectors: np.ndarray, route_embeddings: list[np.ndarray], k: int) -> np.ndarray:
    """Mean of the top-k cosine similarities per route: shape (n_texts, n_routes)."""
    columns = []
    for embeddings in route_embeddings:
        sims = vectors @ embeddings.T
        kk = min(k, sims.shape[1])
        top = np.partition(sims, sims.shape[1] - kk, axis=1)[:, -kk:]
        columns.append(top.mean(axis=1))
    return np.stack(columns, axis=1)


def features(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per route: its similarity and its lead over the best *other* route."""
    if sims.shape[1] == 1:
        return sims, sims
    order = np.sort(sims, axis=1)
    best_other = np.where(sims >= order[:, -1:], order[:, -2:-1], order[:, -1:])
    return sims, sims - best_other


def calibrate(sims: np.ndarray, calibration: tuple[float, float, float] | None) -> np.ndarray:
    """Similarities -> scores in [0, 1]; the clipped similarity while uncalibrated."""
    if calibration is None:
        return np.clip(sims, 0.0, 1.0)
    w_sim, w_lead, bias = calibration
    sim, lead = features(sims)
    return 1.0 / (1.0 + np.exp(-(w_sim * sim + w_lead * lead + bias)))


def fit_calibration(sims: np.ndarray, labels: np.ndarray, routes: list[str]):
    """Logistic regression: is route r right for turn i, from (similarity, lead).

    Returns ``(w_sim, w_lead, bias)``, or None when there is only one class to learn from.
    """
    from sklearn.linear_model import LogisticRegression  # lazy: sklearn is heavy

    target = (labels[:, None] == np.array(routes)[None, :]).ravel()
    if target.all() or not target.any():
        return None
    sim, lead = features(sims)
    x = np.stack([sim.ravel(), lead.ravel()], axis=1)
    # Positives are 1 in n_routes; balancing keeps the score's midpoint meaningful.
    model = LogisticRegression(C=10.0, class_weight="balanced").fit(x, target)
    (w_sim, w_lead), bias = model.coef_[0], model.intercept_[0]
    return (float(w_sim), float(w_lead), float(bias))


def predict(scores: np.ndarray, routes: list[str], threshold, fallback: str) -> np.ndarray:
    """The best route per turn, or ``fallback`` where the best score is below its threshold.

    Args:
        threshold: one cut for every route, or one per route (in ``routes`` order).
    """
    index = scores.argmax(axis=1)
    cut = np.broadcast_to(np.asarray(threshold, dtype=float), (len(routes),))[index]
    return np.where(scores.max(axis=1) >= cut, np.array(routes)[index], fallback)


def fit_route_thresholds(scores: np.ndarray, labels: np.ndarray, routes: list[str], fallback: str,
                         start: float, rounds: int = 2) -> list[float]:
    """One cut per route (``routes`` order), each chosen while the others stay fixed.

    The fallback's own cut stays at ``start``: its turns go to the fallback either way.
    """
    cuts = np.full(len(routes), float(start))
    best = scores.argmax(axis=1)
    for _ in range(rounds):
        for r, name in enumerate(routes):
            mine = best == r
            if name == fallback or not mine.any():
                continue

            def accuracy_at(cut: float, r: int = r) -> float:
                trial = cuts.copy()
                trial[r] = cut
                return float((predict(scores, routes, trial, fallback) == labels).mean())

            cuts[r] = best_cut(scores[mine, r], accuracy_at, int(mine.sum()))
    return [float(c) for c in cuts]


def fit_head(inputs, labels: np.ndarray, routes: list[str],
             sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression: (weight (n_routes, n_inputs), bias (n_routes,))."""
    from sklearn.linear_model import LogisticRegression  # lazy: sklearn is heavy

    # Balanced: a route with thousands of news texts must not outvote one with hundreds of turns.
    model = LogisticRegression(C=HEAD_C, max_iter=3000, class_weight="balanced")
    model.fit(inputs, labels, sample_weight=sample_weight)
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # two routes: one logit z for classes_[1]; softmax(-z/2, z/2) = sigmoid(z)
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    order = [list(model.classes_).index(name) for name in routes]
    return (coef[order].astype(np.float32), intercept[order].astype(np.float32))


def head_inputs(vectors: np.ndarray, texts: list[str], ngrams=None, embedding_weight: float = 1.0):
    """What the head reads: the embeddings (scaled), then the n-gram features when it has them."""
    scaled = np.asarray(vectors, dtype=np.float32) * np.float32(embedding_weight)
    if ngrams is None:
        return scaled
    from scipy.sparse import csr_matrix, hstack  # lazy: scipy is heavy

    return hstack([csr_matrix(scaled), ngrams.transform(texts)], format="csr")


def fit_route_head(embeddings: dict[str, np.ndarray], examples: dict[str, list[str]] | None = None,
                   max_word: int = 0, max_char: int = 0, embedding_weight: float = 1.0,
                   written: dict[str, int] | None = None, written_weight: float = 1.0) -> dict:
    """The head over every route's examples: ``{"routes", "weight", "bias", "ngrams", ...}``.

    With ``examples`` and ``max_word``/``max_char`` > 0, n-gram TF-IDF features of the example
    texts (bot.routing.features) sit beside the embeddings. ``written``: per route, how many of
    its first texts were written as users type (its manifest's ``route_examples``); each weighs
    ``written_weight`` times a data-set text.
    """
    routes = list(embeddings)
    labels = np.array([name for name, e in embeddings.items() for _ in range(len(e))])
    texts = [t for name in routes for t in (examples or {}).get(name, [])]
    ngrams = None
    if examples is not None and (max_word > 0 or max_char > 0):
        ngrams = NgramFeatures.fit(texts, max_word=max_word, max_char=max_char)
    inputs = head_inputs(np.concatenate(list(embeddings.values())), texts, ngrams, embedding_weight)
    sample_weight = np.concatenate([np.where(np.arange(len(e)) < (written or {}).get(name, 0),
                                             float(written_weight), 1.0)
                                    for name, e in embeddings.items()])
    weight, bias = fit_head(inputs, labels, routes, sample_weight)
    return {"routes": routes, "weight": weight, "bias": bias, "ngrams": ngrams,
            "embedding_weight": float(embedding_weight)}


def head_scores(vectors: np.ndarray, head: dict, texts: list[str] | None = None) -> np.ndarray:
    """Softmax probabilities of the head: shape (n_texts, n_routes)."""
    dim, weight = vectors.shape[1], head["weight"]
    scaled = np.asarray(vectors, dtype=np.float32) * np.float32(head.get("embedding_weight", 1.0))
    logits = scaled @ weight[:, :dim].T + head["bias"]
    if head.get("ngrams") is not None:
        # sparse @ a contiguous (n_features, n_routes) array: a strided transpose costs ~5 ms a turn
        if "ngram_weight_t" not in head:
            head["ngram_weight_t"] = np.ascontiguousarray(weight[:, dim:].T)
        logits = logits + np.asarray(head["ngrams"].transform(texts or []) @ head["ngram_weight_t"])
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def best_cut(values: np.ndarray, accuracy_at, n: int) -> float:
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


def fit_threshold(scores: np.ndarray, labels: np.ndarray, routes: list[str], fallback: str) -> float:
    """The cut on the best score that routes the most held-out turns correctly."""
    return best_cut(scores.max(axis=1),
                    lambda cut: float((predict(scores, routes, cut, fallback) == labels).mean()),
                    len(labels))


def fit_margin(scores: np.ndarray, labels: np.ndarray, routes: list[str], threshold,
               default: float) -> float:
    """Margin that best balances follow-ups that should stay and topic changes that should switch.

    Each held-out turn of route y is replayed as a follow-up after every route p: after y it
    should stay with y, after any other p it should switch to y. Both kinds weigh the same.
    Returns ``default`` when there is nothing to fit on (fewer than two routes, no routed turn).
    """
    rows = np.array([i for i, label in enumerate(labels) if label in routes], dtype=int)
    if len(routes) < 2 or not len(rows):
        return default
    scores = scores[rows]
    truth = np.array([routes.index(label) for label in labels[rows]])
    best = scores.argmax(axis=1)
    lead = (scores.max(axis=1)[:, None] - scores).ravel()  # best's lead over each previous p
    previous = np.tile(np.arange(len(routes)), len(rows))
    truth, best = np.repeat(truth, len(routes)), np.repeat(best, len(routes))
    cut = np.broadcast_to(np.asarray(threshold, dtype=float), (len(routes),))[scores.argmax(axis=1)]
    passes = np.repeat(scores.max(axis=1) >= cut, len(routes))
    should_stay, best_is_truth = previous == truth, best == truth

    def accuracy(cut: float) -> float:
        switches = passes & (lead >= cut) & (best != previous)
        right = np.where(should_stay, ~switches, switches & best_is_truth)
        # Balanced: there are n_routes - 1 replays that should switch per one that should stay.
        return float(right[should_stay].mean() + right[~should_stay].mean()) / 2

    return best_cut(lead, accuracy, len(rows))


def fitted_values(threshold: float, margin: float, calibration, thresholds: dict | None = None) -> dict:
    """The fitted values, rounded for reports."""
    return {
        "threshold": round(threshold, 4),
        "thresholds": {name: round(cut, 4) for name, cut in (thresholds or {}).items()},
        "margin": round(margin, 4),
        "calibration": None if calibration is None else dict(
            zip(("w_sim", "w_lead", "bias"), (round(v, 4) for v in calibration), strict=True)),
    }
