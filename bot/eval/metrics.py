"""Evaluation metrics and the TF-IDF baseline used by the eval report.

Everything here is a pure function of its arguments, so it can be tested without a backbone.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

SEED = 0
MAX_MISTAKES = 25  # misrouted turns kept in a report
# Above this many labels a metrics dict (and so metrics.json) holds no dense confusion matrix
# and no full per-class table, which grow with labels squared and with labels: issue 28's
# 10,000-label adapter wrote a 1.3 GB metrics.json. It keeps the most frequent confusions and
# the weakest labels instead, a few KB whatever the label count. The TREC-50 example (50
# labels) stays below it, so its reports keep their confusion plot.
DENSE_LABELS = 64
TOP_CONFUSIONS = 100  # off-diagonal (true, predicted) pairs kept above DENSE_LABELS


def _extend_labels(labels: Sequence[str], *seqs: Sequence[str]) -> list[str]:
    """Declared labels first, then unseen values (e.g. "(fallback)") in order of appearance."""
    out = list(dict.fromkeys(labels))
    seen = set(out)
    for seq in seqs:
        for y in seq:
            if y not in seen:
                out.append(y)
                seen.add(y)
    return out


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class P/R/F1 and the confusion matrix.

    Args:
        y_true: gold labels.
        y_pred: predicted labels; values outside ``labels`` become extra labels.
        labels: declared label order (rows/cols of ``confusion``).

    Returns:
        dict with ``n``, ``accuracy``, ``macro_f1``, ``per_class``, ``confusion``
        (rows = true, cols = pred) and ``labels`` (declared + extras). ``macro_f1``
        averages over labels that are declared or occur in ``y_true``: a
        prediction-only label like "(fallback)" has no support, and counting its
        F1 of 0 would punish the model twice for the same error. ``accuracy`` and
        ``macro_f1`` are None when there are no examples. With more than
        ``DENSE_LABELS`` labels, ``confusion`` and ``labels`` give way to
        ``n_labels`` and ``top_confusions`` (the ``TOP_CONFUSIONS`` most frequent
        ``{"true", "pred", "count"}`` mistakes), and ``per_class`` holds the
        ``DENSE_LABELS`` labels with the lowest F1 (``per_class_kept`` says so): the
        dict stays a few KB whatever the label count. Time and memory grow with the
        examples and labels, never with labels squared.
    """
    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    all_labels = _extend_labels(labels, y_true, y_pred)
    n = len(y_true)
    pairs = Counter(zip(y_true, y_pred))
    support, predicted = Counter(y_true), Counter(y_pred)
    per_class = {}
    for lab in all_labels:
        tp = pairs.get((lab, lab), 0)
        fp, fn = predicted.get(lab, 0) - tp, support.get(lab, 0) - tp
        per_class[lab] = {"precision": tp / (tp + fp) if tp + fp else 0.0,
                          "recall": tp / (tp + fn) if tp + fn else 0.0,
                          "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
                          "support": support.get(lab, 0)}
    macro_labels = _extend_labels(labels, y_true)
    out = {
        "n": n,
        "accuracy": sum(c for (t, p), c in pairs.items() if t == p) / n if n else None,
        "macro_f1": float(np.mean([per_class[lab]["f1"] for lab in macro_labels])) if n else None,
    }
    if len(all_labels) <= DENSE_LABELS:
        index = {lab: i for i, lab in enumerate(all_labels)}
        confusion = [[0] * len(all_labels) for _ in all_labels]
        for (t, p), c in pairs.items():
            confusion[index[t]][index[p]] = c
        return {**out, "per_class": per_class, "confusion": confusion, "labels": all_labels}
    mistakes = sorted(((c, t, p) for (t, p), c in pairs.items() if t != p),
                      key=lambda m: (-m[0], m[1], m[2]))
    weakest = sorted(per_class, key=lambda lab: (per_class[lab]["support"] == 0,
                                                 per_class[lab]["f1"], -per_class[lab]["support"], lab))
    return {**out, "n_labels": len(all_labels),
            "top_confusions": [{"true": t, "pred": p, "count": c}
                               for c, t, p in mistakes[:TOP_CONFUSIONS]],
            "per_class": {lab: per_class[lab] for lab in weakest[:DENSE_LABELS]},
            "per_class_kept": f"the {DENSE_LABELS} labels with the lowest F1 of "
                              f"{len(all_labels)} (more than {DENSE_LABELS} labels)"}


def perplexity(token_nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token).

    Args:
        token_nll_sum: summed natural-log NLL over all scored tokens.
        n_tokens: number of scored tokens (> 0).
    """
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    try:
        return math.exp(token_nll_sum / n_tokens)
    except OverflowError:  # a diverged model should show as inf, not crash the report
        return math.inf


def router_metrics(y_true: Sequence[str], y_pred: Sequence[str], fallback_flags: Sequence[bool],
                   labels: Sequence[str] | None = None, texts: Sequence[str] | None = None) -> dict:
    """Classification metrics over adapter names plus the fallback rate (and mistakes).

    The one schema of router quality: ``Router.evaluate`` and ``bot eval`` both return it.

    Args:
        y_true: gold adapter names.
        y_pred: routed adapter names (may include a fallback route).
        fallback_flags: True where the router fell back instead of choosing.
        labels: route order; defaults to the sorted gold adapter names.
        texts: the turns; when given, ``mistakes`` lists the first ``MAX_MISTAKES`` misrouted
            ones as ``{"text" (first 160 chars), "want", "got"}``.
    """
    if len(fallback_flags) != len(y_true):
        raise ValueError(f"{len(fallback_flags)} fallback flags for {len(y_true)} examples")
    out = classification_metrics(y_true, y_pred, sorted(set(y_true)) if labels is None else labels)
    out["fallback_rate"] = float(np.mean(fallback_flags)) if len(fallback_flags) else None
    if texts is not None:
        out["mistakes"] = [{"text": t[:160], "want": w, "got": g}
                           for t, w, g in zip(texts, y_true, y_pred, strict=True) if w != g][:MAX_MISTAKES]
    return out


def tfidf_baseline(train_texts: Sequence[str], train_labels: Sequence[str],
                   test_texts: Sequence[str]) -> list[str]:
    """TF-IDF (word 1-2 grams) + logistic regression: the no-transfer reference.

    Args:
        train_texts: training inputs.
        train_labels: their labels.
        test_texts: inputs to label.

    Returns:
        predicted label per test text.
    """
    if not test_texts:
        return []
    classes = sorted(set(train_labels))
    if len(classes) < 2:  # LogisticRegression refuses one class; the answer is trivial anyway
        return [classes[0] if classes else ""] * len(test_texts)
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=1)
    clf = LogisticRegression(max_iter=2000, C=10.0, random_state=SEED)
    clf.fit(vec.fit_transform(train_texts), list(train_labels))
    return [str(y) for y in clf.predict(vec.transform(test_texts))]


Z95 = 1.959964  # two-sided 95 % normal quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """95 % Wilson score interval of an accuracy of ``correct`` out of ``n`` (None when n is 0).

    Wilson's interval stays inside [0, 1] and keeps its coverage near 0 % and 100 %, where
    the plain normal interval (p +- z sqrt(p(1-p)/n)) collapses to a point.
    """
    if n <= 0:
        return None
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a_right: Sequence[bool], b_right: Sequence[bool], z: float = Z95) -> dict:
    """Accuracy of A minus accuracy of B on the same examples, with a 95 % interval.

    The two are scored on the same texts, so the difference is paired: only the texts
    where exactly one of them is right carry information (``a_only``, ``b_only``). The
    interval is the normal one for a paired difference of proportions, Var = (a_only +
    b_only - (a_only - b_only)^2 / n) / n^2, the variance behind McNemar's test. From it:
    "beats" when the whole interval is above 0, "loses" when it is below 0, else "ties".
    """
    if len(a_right) != len(b_right):
        raise ValueError(f"paired difference needs the same examples: {len(a_right)} vs {len(b_right)}")
    n = len(a_right)
    if n == 0:
        return {"n": 0, "diff": None, "low": None, "high": None, "verdict": None}
    a_only = sum(1 for a, b in zip(a_right, b_right) if a and not b)
    b_only = sum(1 for a, b in zip(a_right, b_right) if b and not a)
    diff = (a_only - b_only) / n
    var = max(0.0, (a_only + b_only - (a_only - b_only) ** 2 / n)) / (n * n)
    half = z * math.sqrt(var)
    low, high = diff - half, diff + half
    verdict = "beats" if low > 0 else "loses" if high < 0 else "ties"
    return {"n": n, "a_only": a_only, "b_only": b_only, "diff": diff, "low": low, "high": high,
            "verdict": verdict}


def right(truth: Sequence[str], preds: Sequence[str]) -> list[bool]:
    return [t == p for t, p in zip(truth, preds, strict=True)]


def comparison_text(cmp: dict | None, what: str = "the TF-IDF baseline") -> str:
    """e.g. ``beats the TF-IDF baseline: +3.1 points (95 % interval +1.2 to +5.0)``."""
    if not cmp or cmp.get("diff") is None:
        return f"not compared with {what}"
    verb = {"beats": "beats", "ties": "ties with", "loses": "loses to"}[cmp["verdict"]]
    return (f"{verb} {what}: {100 * cmp['diff']:+.1f} points (95 % interval "
            f"{100 * cmp['low']:+.1f} to {100 * cmp['high']:+.1f}, n={cmp['n']})")


def transfer_verdict(adapter_acc: float, baseline_acc: float | None,
                     zero_shot_acc: float | None = None, comparison: dict | None = None) -> str:
    """One plain-words sentence comparing the adapter with its references.

    Args:
        adapter_acc: adapter held-out accuracy in [0, 1].
        baseline_acc: TF-IDF baseline accuracy in [0, 1], or None if not run.
        zero_shot_acc: base-backbone zero-shot accuracy in [0, 1], or None.
    """
    if adapter_acc is None:
        return "The adapter was not evaluated."
    if comparison and comparison.get("verdict"):  # the paired 95 % interval decides
        text = f"The adapter {comparison_text(comparison)}"
        if comparison["verdict"] == "loses":
            text += ": transfer did not help this task"
        elif comparison["verdict"] == "ties":
            text += ": transfer did not help measurably on these examples"
        if zero_shot_acc is not None:
            text += f"; the zero-shot backbone scores {100 * zero_shot_acc:.1f} %"
        return text + "."
    if baseline_acc is not None and adapter_acc <= baseline_acc:
        return (f"The adapter ({100 * adapter_acc:.1f} %) does not beat the TF-IDF baseline "
                f"({100 * baseline_acc:.1f} %): transfer did not help this task.")
    if baseline_acc is None and zero_shot_acc is None:
        return f"The adapter reaches {100 * adapter_acc:.1f} %; no reference was run."
    clauses = []
    if baseline_acc is not None:
        clauses.append(f"beats the TF-IDF baseline by {100 * (adapter_acc - baseline_acc):+.1f} points")
    if zero_shot_acc is not None:
        gain = 100 * (adapter_acc - zero_shot_acc)
        if gain >= 0:
            clauses.append(f"{'' if clauses else 'beats '}the zero-shot backbone by {gain:+.1f} points")
        else:  # possible when pre-training already covers the task
            clauses.append(f"trails the zero-shot backbone by {-gain:.1f} points")
    joiner = " but " if zero_shot_acc is not None and adapter_acc < zero_shot_acc else " and "
    return "The adapter " + joiner.join(clauses) + "."
