"""Abstain when unsure (bot.routing.abstain), the second stage over a changed route set, batched
routing, and routed end-to-end accuracy in `bot eval` (bot.eval.evaluate.eval_routed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import HELDOUT, ROUTE_VOCAB, HashEncoder, Oracle, make_router, route_spec

from bot.errors import DataError
from bot.routing import abstain as ab
from bot.routing.second import SecondStage


def test_fit_abstains_exactly_where_routes_are_mostly_wrong():
    scores = [0.1, 0.2, 0.3, 0.35, 0.6, 0.7, 0.8, 0.9]
    right = [False, False, True, False, False, True, True, True]
    fitted = ab.fit(scores, right)
    # (right - wrong) / 8 when abstaining on the k least confident: k=0 0, k=2 2/8, k=3 1/8,
    # k=4 2/8, k=5 3/8 (best), k=6 2/8: the cut falls between 0.6 and 0.7
    assert fitted["threshold"] == pytest.approx(0.65)
    assert fitted["on"] and fitted["utility"] == pytest.approx(3 / 8)
    assert fitted["utility_never"] == pytest.approx(0.0)
    assert fitted["abstain_rate"] == pytest.approx(5 / 8) and fitted["accuracy_rest"] == 1.0
    assert fitted["accuracy_all"] == pytest.approx(4 / 8)
    # ties go to the lower threshold (fewer questions): k=2 and k=4 both give 4/8 here
    assert ab.fit(scores, [False, False, True, False, True, True, True, True])["threshold"] == \
        pytest.approx(0.25)


def test_fit_stays_off_when_abstaining_does_not_help_and_weights_count():
    fitted = ab.fit([0.2, 0.5, 0.9], [True, True, True])
    assert fitted["threshold"] == 0.0 and not fitted["on"] and fitted["abstain_rate"] == 0.0
    # a wrong turn above a right one that weighs more: not worth a question
    fitted = ab.fit([0.3, 0.2, 0.9], [False, True, True], weights=[1, 3, 1])
    assert fitted["threshold"] == 0.0 and not fitted["on"]
    # equal scores are abstained on together, never split
    fitted = ab.fit([0.4, 0.4, 0.9], [False, True, True], weights=[3, 1, 1])
    assert fitted["threshold"] == pytest.approx(0.65) and fitted["on"]
    with pytest.raises(DataError):
        ab.fit([], [])


def test_unsure_turns_get_a_question_listing_the_likely_routes():
    router = make_router(chat_route=True)
    router.describe = {"sentiment": "opinions about things", "topic": "news", "chat": "small talk"}
    rule = ab.Abstain(threshold=0.99, on=True)
    choice = router.route("the bank team film")
    assert rule.unsure(choice)
    question = rule.question(choice, router.describe)
    ranked = sorted(choice.scores, key=choice.scores.get, reverse=True)
    assert f"`/{ranked[0]}`" in question and "Did you mean" in question
    assert f"e.g. `/{ranked[0]} the bank team film`" in question
    assert not rule.unsure(router.route("/topic the bank team film"))  # a command decides
    assert not rule.unsure(router.route("/help"))
    assert not ab.Abstain(threshold=0.0, on=True).unsure(choice)


def test_clarify_follows_the_default_and_the_request():
    router = make_router(chat_route=True)
    choice = router.route("zebra")
    assert ab.clarify(router, choice) is None  # nothing fitted
    router.abstain = ab.Abstain(threshold=0.99, on=False)
    assert ab.clarify(router, choice) is None  # off by default ...
    assert ab.clarify(router, choice, requested=True)  # ... on when asked for
    router.abstain.on = True
    assert ab.clarify(router, choice) and ab.clarify(router, choice, requested=False) is None


def test_parse_request_reads_the_bot_field_and_names_the_fix():
    assert ab.parse_request(None) is None and ab.parse_request({}) is None
    assert ab.parse_request({"abstain": True}) is True and ab.parse_request({"abstain": False}) is False
    for bad, what in [("yes", "must be an object"), ({"abstain": "yes"}, "bot.abstain"),
                      ({"abstain": 1}, "bot.abstain"), ({"absatin": True}, "unknown key")]:
        with pytest.raises(DataError, match=f"{what}.*Fix:"):
            ab.parse_request(bad)


def test_chat_session_answers_an_unsure_turn_with_the_question():
    from bot.chat import ChatSession

    router = make_router(chat_route=True)
    router.abstain = ab.Abstain(threshold=0.99, on=True)
    session = ChatSession(None, {}, router)  # no adapter runs for a clarifying question
    turn = session.send("zebra quantum soup")
    assert turn.abstained and turn.adapter is None and "Did you mean" in turn.reply
    assert "abstain threshold 0.99" in turn.route.reason and session.history == []
    turn = session.send("zebra quantum soup", abstain=False)
    assert not turn.abstained and "Did you mean" not in turn.reply


def test_attach_fits_on_validation_and_caches_beside_the_router(tmp_path, monkeypatch):

    from bot.routing import build_router

    monkeypatch.setenv("BOT_CACHE", str(tmp_path / "cache"))
    specs = [route_spec(tmp_path / "adapters", r) for r in ("pets", "food", "animals")]
    router = build_router(specs, HashEncoder())
    rule = router.abstain
    assert rule is not None and rule.figures["n"] >= ab.MIN_TURNS
    assert rule.figures["routes"] == router.routes and 0 <= rule.figures["abstain_rate"] <= 1
    (cached,) = router.cache_path.glob("abstain-first.json")
    assert json.loads(cached.read_text())["threshold"] == rule.threshold
    monkeypatch.setattr(ab, "fit", lambda *a, **k: pytest.fail("refitted although cached"))
    assert build_router(specs, HashEncoder()).abstain.threshold == rule.threshold
    # pets and animals share their words: the router is unsure between them, so it helps
    assert rule.on and rule.threshold > 0 and rule.figures["accuracy_rest"] > rule.figures["accuracy_all"]


def test_route_all_decides_as_route_does_one_turn_at_a_time():
    router = make_router(chat_route=True)
    router.fit(HELDOUT, head=False)
    texts = ["loved the movie", "bank shares fall", "/topic hello", "and this one?", "", "zebra"]
    assert router.route_all(texts) == [router.route(t) for t in texts]
    router.second = SecondStage(Oracle(router.routes, {"zebra": "topic"}), gate=1.01, weight=0.5)
    assert router.route_all(texts) == [router.route(t) for t in texts]


def test_second_stage_over_a_changed_route_set_shares_out_the_known_mass():
    router = make_router(chat_route=True)  # routes sentiment, topic, chat
    oracle = Oracle(["sentiment", "topic"], {"good bank": "topic"}, sure=0.9)
    stage = SecondStage(oracle, gate=1.01, weight=0.5)
    router.second = stage
    plain = router.route("good bank")
    assert "route adapter" not in plain.reason  # a route set it was never checked on: quiet
    stage.route_sets.append(sorted(router.routes))  # what extension_check adds when it helps
    mixed = router.route("good bank")
    first = {n: s for n, s in plain.scores.items() if n in router.routes}
    mass = first["sentiment"] + first["topic"]
    assert mixed.scores["chat"] == pytest.approx(first["chat"], abs=1e-4)  # it never saw chat
    assert mixed.scores["topic"] == pytest.approx(0.5 * first["topic"] + 0.5 * mass * 0.9, abs=1e-3)
    assert mixed.scores["sentiment"] + mixed.scores["topic"] == pytest.approx(mass, abs=2e-4)
    assert "over the 2 routes it was trained on" in mixed.reason


def test_extension_check_measures_both_ways_on_validation(tmp_path, monkeypatch):

    from bot.routing import build_router
    from bot.routing.second import extension_check

    monkeypatch.setenv("BOT_CACHE", str(tmp_path / "cache"))
    specs = [route_spec(tmp_path / "adapters", r) for r in ("pets", "food", "weather")]
    router = build_router(specs, HashEncoder())
    stage_file = tmp_path / "stage.json"
    stage_file.write_text(json.dumps({"routes": ["pets", "food"], "gate": 1.01, "weight": 0.5}))

    class Wrong(Oracle):  # a second opinion that is always wrong between pets and food
        def predict(self, texts, batch_size=32):
            return [{"pets": 0.05, "food": 0.95} if "item" in t and not any(
                w in t for w in sum(ROUTE_VOCAB["food"].values(), [])) else {"pets": 0.95, "food": 0.05}
                for t in texts]

    check = extension_check(router, SecondStage(Wrong(["pets", "food"], {}), 1.01, 0.9), specs,
                            tmp_path, stage_file)
    assert check["n"] > 0 and check["extended"] < check["first_stage"] and not check["on"]
    assert json.loads((router.cache_path / "second.json").read_text())["stage"] == check["stage"]


def test_eval_routed_counts_a_text_right_only_when_routed_to_it_and_labelled_right():
    from bot.eval.evaluate import eval_routed

    router = make_router(chat_route=True)
    router.fit(HELDOUT, head=False)
    rows = [{"text": "loved the movie", "label": "pos"}, {"text": "awful product", "label": "neg"},
            {"text": "bank shares fall", "label": "pos"}, {"text": "great food", "label": "neg"}]
    routes = [router.route(r["text"]).adapter for r in rows]
    preds = ["pos", "neg", "pos", "pos"]  # the last label is wrong
    out = eval_routed(router, "sentiment", rows, {"text": preds})["text"]
    right = [p == r["label"] for p, r in zip(preds, rows)]
    assert out["oracle_accuracy"] == pytest.approx(np.mean(right))
    assert out["routed_accuracy"] == pytest.approx(np.mean([a == "sentiment" and r for a, r in zip(routes, right)]))
    assert out["routed_to_adapter"] == pytest.approx(np.mean([a == "sentiment" for a in routes]))
    assert out["cost_points"] == pytest.approx(100 * (out["oracle_accuracy"] - out["routed_accuracy"]), abs=0.01)
    assert sum(out["elsewhere"].values()) == sum(a != "sentiment" for a in routes)


def test_report_shows_routed_accuracy_and_abstain(tmp_path):
    from bot.eval.report import write_report

    results = {"tasks": {"spam": {"kind": "classify", "status": "ok", "n_test": 10,
                                  "adapter": {"accuracy": 0.9, "n": 10},
                                  "routed": {"text": {"n": 10, "oracle_accuracy": 0.9, "routed_accuracy": 0.7,
                                                      "routed_to_adapter": 0.8, "cost_points": 20.0,
                                                      "elsewhere": {"chat": 2}}}}},
               "router": {"accuracy": 0.95, "n": 100, "abstain": {
                   "threshold": 0.42, "on_by_default": False,
                   "validation": {"n": 300, "abstain_rate": 0.05, "accuracy_rest": 0.97, "accuracy_all": 0.95},
                   "heldout": {"n": 100, "abstain_rate": 0.04, "accuracy_rest": 0.96, "accuracy_all": 0.95,
                               "wrong_caught": 2, "right_lost": 2}}}}
    _, md = write_report(results, tmp_path, plots=False)
    text = md.read_text()
    assert "## Routed end to end" in text and "| spam | text | 10 | 90.0 % | 70.0 % | 20.0 |" in text
    assert "chat 2" in text and "below a route score of 0.420" in text and "off by default" in text
    assert "| held out (100) | 4.0 % | 96.0 % | 95.0 % | 2 | 2 |" in text


def test_demo_toggle_follows_the_fitted_default_and_the_tab_shows_routed_accuracy(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from demo import app as demo_app

    router = make_router()
    session = SimpleNamespace(router=router)
    assert demo_app.abstain_toggle(session)["interactive"] is False  # nothing fitted
    router.abstain = ab.Abstain(threshold=0.42, on=True)
    toggle = demo_app.abstain_toggle(session)
    assert toggle["value"] is True and "0.42" in toggle["info"] and "helped on validation" in toggle["info"]
    router.abstain.on = False
    assert demo_app.abstain_toggle(session)["value"] is False

    reports = tmp_path / "reports"
    reports.mkdir()
    monkeypatch.setattr(demo_app, "REPORTS", reports)
    assert demo_app.routed_summary() == ""
    (reports / "eval.json").write_text(json.dumps({"tasks": {"spam": {"routed": {"text": {
        "n": 200, "oracle_accuracy": 0.885, "routed_accuracy": 0.755, "cost_points": 13.0}}}}}))
    (reports / "eval.md").write_text("# Evaluation report\n")
    text, _ = demo_app.eval_view()
    summary = demo_app.routed_summary()
    assert "| spam | text | 200 | 88.5 % | 75.5 % | 13.0 |" in summary
    assert text.startswith("# Evaluation report")
