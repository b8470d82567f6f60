"""Pure functions that turn similarities, scores and labels into the router's fitted values.

* ``similarity``: per route, the mean of its ``per_adapter_k`` highest cosine similarities to
  the turn (top-k is less noisy than the single nearest example and less diluted than the mean);
* ``score``: that similarity calibrated into [0, 1] by a logistic model over two features that
  do not depend on which route it is: the similarity itself and its lead over the best other
  route. Because the features are route-agnostic, a route added later is scored without refitting;
* ``threshold``: the best score below which a turn falls back;
* ``margin``: how much another route must lead for a follow-up to switch away.

Arrays are (n_turns, n_routes) with columns in ``routes`` order; labels are adapter names.
"""

from __future__ import annotations

import numpy as np


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
    from sklearn.linear_model import LogisticRegression

    target = (labels[:, None] == np.array(routes)[None, :]).ravel()
    if target.all() or not target.any():
        return None
    sim, lead = features(sims)
    x = np.stack([sim.ravel(), lead.ravel()], axis=1)
    # Positives are 1 in n_routes; balancing keeps the score's midpoint meaningful.
    model = LogisticRegression(C=10.0, class_weight="balanced").fit(x, target)
    (w_sim, w_lead), bias = model.coef_[0], model.intercept_[0]
    return (float(w_sim), float(w_lead), float(bias))


def predict(scores: np.ndarray, routes: list[str], threshold: float, fallback: str) -> np.ndarray:
    """The best route per turn, or ``fallback`` where the best score is below ``threshold``."""
    best = np.array(routes)[scores.argmax(axis=1)]
    return np.where(scores.max(axis=1) >= threshold, best, fallback)


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


def fit_margin(scores: np.ndarray, labels: np.ndarray, routes: list[str], threshold: float,
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
    passes = np.repeat(scores.max(axis=1) >= threshold, len(routes))
    should_stay, best_is_truth = previous == truth, best == truth

    def accuracy(cut: float) -> float:
        switches = passes & (lead >= cut) & (best != previous)
        right = np.where(should_stay, ~switches, switches & best_is_truth)
        # Balanced: there are n_routes - 1 replays that should switch per one that should stay.
        return float(right[should_stay].mean() + right[~should_stay].mean()) / 2

    return best_cut(lead, accuracy, len(rows))


def fitted_values(threshold: float, margin: float, calibration) -> dict:
    """The fitted values, rounded for reports."""
    return {
        "threshold": round(threshold, 4),
        "margin": round(margin, 4),
        "calibration": None if calibration is None else dict(
            zip(("w_sim", "w_lead", "bias"), (round(v, 4) for v in calibration), strict=True)),
    }
