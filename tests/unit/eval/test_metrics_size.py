"""A task's metrics stay small however many labels it has (issue 28, item 8): the full confusion
matrix for few labels (checked against sklearn), the top confusions for thousands.
"""

from __future__ import annotations

import json
import random

import pytest
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from bot.eval.metrics import DENSE_LABELS, TOP_CONFUSIONS, classification_metrics


def _predictions(n_labels, per_label, wrong=0.3, seed=0):
    rng = random.Random(seed)
    labels = [f"label-{i:05d}" for i in range(n_labels)]
    truth = [lab for lab in labels for _ in range(per_label)]
    preds = [rng.choice(labels) if rng.random() < wrong else t for t in truth]
    return labels, truth, preds


def test_8_metrics_of_3000_labels_stay_a_few_kb():
    labels, truth, preds = _predictions(3000, 3)
    m = classification_metrics(truth, preds, labels)
    size = len(json.dumps(m))
    assert size < 30_000, f"metrics are {size:,} bytes for 3,000 labels"
    assert "confusion" not in m and m["n_labels"] == 3000
    assert m["accuracy"] == pytest.approx(sum(t == p for t, p in zip(truth, preds)) / len(truth))
    _, _, f1, _ = precision_recall_fscore_support(truth, preds, labels=labels, zero_division=0)
    assert m["macro_f1"] == pytest.approx(f1.mean())
    top = m["top_confusions"]
    assert 0 < len(top) <= TOP_CONFUSIONS and all(c["true"] != c["pred"] for c in top)
    assert [c["count"] for c in top] == sorted((c["count"] for c in top), reverse=True)
    assert len(m["per_class"]) == DENSE_LABELS and "lowest F1" in m["per_class_kept"]
    worst = min(f1)
    assert min(v["f1"] for v in m["per_class"].values()) == pytest.approx(worst)


def test_8_metrics_of_few_labels_keep_the_full_matrix_and_match_sklearn():
    labels, truth, preds = _predictions(7, 20, wrong=0.4, seed=3)
    preds[0] = "(fallback)"  # a prediction-only label becomes an extra column, as before
    m = classification_metrics(truth, preds, labels)
    every = labels + ["(fallback)"]
    assert m["labels"] == every
    assert m["confusion"] == confusion_matrix(truth, preds, labels=every).tolist()
    p, r, f, s = precision_recall_fscore_support(truth, preds, labels=every, zero_division=0)
    for i, lab in enumerate(every):
        got = m["per_class"][lab]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(
            (p[i], r[i], f[i], s[i]))
    assert m["macro_f1"] == pytest.approx(f[:-1].mean())  # "(fallback)" has no support
