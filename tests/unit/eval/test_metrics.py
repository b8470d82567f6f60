"""Metrics checked against values worked out by hand."""

import math

import pytest

from bot.eval import metrics

# Hand-worked example.
#   y_true = a a a b b c
#   y_pred = a a b b c c
# Confusion (rows = true, cols = pred, order a b c):
#   a: [2, 1, 0]   two a's right, one a called b
#   b: [0, 1, 1]   one b right, one b called c
#   c: [0, 0, 1]   the c right
# accuracy = (2 + 1 + 1) / 6 = 2/3
# a: P = 2/2 = 1,   R = 2/3, F1 = 2*1*(2/3) / (1 + 2/3) = 4/5
# b: P = 1/2 (pred b: a->b, b->b), R = 1/2, F1 = 1/2
# c: P = 1/2 (pred c: b->c, c->c), R = 1/1, F1 = 2*(1/2)*1 / (3/2) = 2/3
# macro-F1 = (4/5 + 1/2 + 2/3) / 3 = (24 + 15 + 20) / 90 = 59/90
Y_TRUE = ["a", "a", "a", "b", "b", "c"]
Y_PRED = ["a", "a", "b", "b", "c", "c"]


def test_classification_metrics_hand_worked():
    m = metrics.classification_metrics(Y_TRUE, Y_PRED, ["a", "b", "c"])
    assert m["n"] == 6
    assert m["labels"] == ["a", "b", "c"]
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    expected = {
        "a": (1.0, 2 / 3, 4 / 5, 3),
        "b": (1 / 2, 1 / 2, 1 / 2, 2),
        "c": (1 / 2, 1.0, 2 / 3, 1),
    }
    for lab, (p, r, f, s) in expected.items():
        c = m["per_class"][lab]
        assert (c["precision"], c["recall"], c["f1"]) == pytest.approx((p, r, f)), lab
        assert c["support"] == s
    assert m["macro_f1"] == pytest.approx(59 / 90)


def test_confusion_follows_given_label_order():
    m = metrics.classification_metrics(Y_TRUE, Y_PRED, ["c", "b", "a"])
    # Same matrix as above with rows and columns reversed.
    assert m["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 1, 2]]


def test_prediction_outside_labels_becomes_extra_column():
    # labels a b; the model once answered "(fallback)" for a true b.
    # Confusion (a, b, (fallback)): a [1,0,0], b [0,1,1], (fallback) [0,0,0]
    # a: P=1 R=1 F1=1; b: P=1 R=1/2 F1=2/3; macro over declared a,b = 5/6
    # (the prediction-only label has no support and is left out of the macro mean).
    m = metrics.classification_metrics(["a", "b", "b"], ["a", "(fallback)", "b"], ["a", "b"])
    assert m["labels"] == ["a", "b", "(fallback)"]
    assert m["confusion"] == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx(5 / 6)
    assert m["per_class"]["(fallback)"]["support"] == 0


def test_empty_and_mismatched_inputs():
    assert metrics.classification_metrics([], [], ["a"])["accuracy"] is None
    with pytest.raises(ValueError):
        metrics.classification_metrics(["a"], [], ["a"])


def test_perplexity_known_distributions():
    # Uniform over 4 tokens: every token costs ln 4 nats, so perplexity = 4.
    assert metrics.perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    # exp(-(ln .5 + ln .25) / 2) = exp(ln 8 / 2) = sqrt(8)
    assert metrics.perplexity(-(math.log(0.5) + math.log(0.25)), 2) == pytest.approx(math.sqrt(8))
    assert metrics.perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        metrics.perplexity(1.0, 0)


def test_router_metrics_fallback_rate():
    y_true = ["topic", "chat", "sentiment", "chat"]
    y_pred = ["topic", "chat", "chat", "(fallback)"]
    m = metrics.router_metrics(y_true, y_pred, [False, False, False, True])
    assert m["fallback_rate"] == pytest.approx(0.25)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["labels"] == ["chat", "sentiment", "topic", "(fallback)"]
    # chat row: one right, one fell back.
    assert m["confusion"][0] == [1, 0, 0, 1]


def test_tfidf_baseline_separable_toy_set():
    train = ["good great nice", "great lovely good", "nice good fun",
             "bad awful terrible", "terrible horrid bad", "awful bad sad"]
    labels = ["pos", "pos", "pos", "neg", "neg", "neg"]
    preds = metrics.tfidf_baseline(train, labels, ["so good and nice", "awful and terrible", "lovely"])
    assert preds == ["pos", "neg", "pos"]
    assert metrics.tfidf_baseline(train, labels, []) == []


def test_transfer_verdict_wording():
    below = metrics.transfer_verdict(0.81, 0.82, 0.50)
    assert "transfer did not help" in below
    assert "81.0 %" in below and "82.0 %" in below
    assert "transfer did not help" in metrics.transfer_verdict(0.82, 0.82, 0.50)  # a tie is no gain
    above = metrics.transfer_verdict(0.90, 0.80, 0.50)
    assert "transfer did not help" not in above
    assert "+10.0 points" in above and "+40.0 points" in above


def test_wilson_interval_known_values_and_edges():
    lo, hi = metrics.wilson_interval(90, 100)
    assert lo == pytest.approx(0.8256, abs=1e-3) and hi == pytest.approx(0.9448, abs=1e-3)
    lo, hi = metrics.wilson_interval(100, 100)  # 100 %: still an interval, not a point
    assert hi == 1.0 and 0.95 < lo < 0.97
    assert metrics.wilson_interval(0, 0) is None
    # more examples, narrower interval around the same accuracy
    narrow = metrics.wilson_interval(900, 1000)
    assert narrow[1] - narrow[0] < hi - lo + 1 and narrow[1] - narrow[0] < 0.04


def test_paired_difference_beats_ties_and_loses():
    n = 400
    # A right on 40 texts where B is wrong, B right on 10 where A is wrong: +7.5 points
    a = [True] * 40 + [False] * 10 + [True] * 300 + [False] * 50
    b = [False] * 40 + [True] * 10 + [True] * 300 + [False] * 50
    cmp = metrics.paired_difference(a, b)
    assert cmp["n"] == n and cmp["a_only"] == 40 and cmp["b_only"] == 10
    assert cmp["diff"] == pytest.approx(30 / n) and cmp["low"] > 0 and cmp["verdict"] == "beats"
    assert metrics.paired_difference(b, a)["verdict"] == "loses"
    # 2 more right of 400: inside the noise
    close = metrics.paired_difference([True] * 6 + [False] * 4 + [True] * 390,
                                      [False] * 6 + [True] * 4 + [True] * 390)
    assert close["diff"] > 0 and close["low"] < 0 < close["high"] and close["verdict"] == "ties"
    with pytest.raises(ValueError, match="same examples"):
        metrics.paired_difference([True], [True, False])


def test_verdict_follows_the_paired_interval_not_the_point_estimate():
    tie = metrics.paired_difference([True] * 6 + [False] * 4, [False] * 6 + [True] * 4)
    text = metrics.transfer_verdict(0.6, 0.4, 0.3, tie)
    assert text.startswith("The adapter ties with the TF-IDF baseline: +20.0 points (95 % interval")
    assert "did not help measurably" in text
    assert "zero-shot backbone scores 30.0 %" in text
