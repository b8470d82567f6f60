"""The router's second stage (bot.routing.second): a route adapter asked when the first is unsure."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from helpers import Oracle, make_router, make_tiny_backbone

from bot.manifests import router_folder
from bot.routing import route_data
from bot.routing.second import SecondStage, attach, plain, spellings
from bot.training.second_stage import fit_stage


def test_plain_drops_data_set_quirks_and_keeps_typed_text():
    assert plain("Why doesn 't www.answers.com have any answers to my questions ?") == \
        "Why doesn't www.answers.com have any answers to my questions?"
    assert plain("(''Take Care of My Cat'') is nice , really .") == '("Take Care of My Cat") is nice, really.'
    assert plain("all smiles :D   &lt;3333") == "all smiles :D <3333"
    assert plain("It 's what they 're for") == "It's what they're for"
    typed = "What's the capital of Japan? I can't remember!"
    assert plain(typed) == typed


def test_spellings_are_how_people_type_an_example():
    assert spellings("What is an API?") == ["What is an API?", "what is an api?", "What is an API",
                                            "what is an api"]
    assert spellings("ok") == ["ok"]


def test_asked_only_below_the_gate_and_the_reason_says_so():
    router = make_router(chat_route=True)
    oracle = Oracle(router.routes, {"the food was bad": "topic"})
    router.second = SecondStage(oracle, gate=0.0, weight=0.5)  # gate 0: never asked
    before = router.route("the food was bad")
    assert oracle.seen == [] and "route adapter" not in before.reason
    router.second = SecondStage(oracle, gate=1.01, weight=0.9)  # always asked, and trusted
    after = router.route("the food was bad")
    assert oracle.seen == ["the food was bad"] and router.second.asked == 1
    assert after.adapter == "topic" != before.adapter
    assert "route adapter, which says 'topic' 0.97" in after.reason
    # mixed scores: 0.1 of the first stage's plus 0.9 of the adapter's
    assert after.scores["topic"] == pytest.approx(0.1 * before.scores["topic"] + 0.9 * 0.97, abs=1e-3)
    assert router.route("/sentiment the food was bad").adapter == "sentiment"  # commands still win
    assert router.second.asked == 1
    router.add_route("weather", ["will it rain tomorrow", "sunny and warm today"])
    assert "route adapter" not in router.route("the food was bad").reason  # it never saw 'weather'
    assert router.second.asked == 1


def test_the_adapter_reads_plain_text():
    router = make_router(chat_route=True)
    oracle = Oracle(router.routes, {})
    router.second = SecondStage(oracle, gate=1.01, weight=0.5)
    router.route("Why doesn 't it work ?")
    assert oracle.seen == ["Why doesn't it work?"]


def test_probs_of_a_real_classify_adapter_follow_its_labels():
    from bot.manifests.spec import AdapterSpec
    from bot.tasks import task_class

    bb = make_tiny_backbone()
    spec = AdapterSpec.from_dict({"name": "router", "kind": "classify", "labels": ["b", "a", "c"],
                                  "template": "{text}", "lora": {"r": 4, "layers": [1]}})
    bb.add_adapter("router", spec.lora.to_peft(bb.base.config.num_hidden_layers))
    task = task_class("classify")(spec, bb)
    probs = SecondStage(task, 1.0, 0.5).probs(["one turn", "another, longer turn"])
    assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    direct = task.predict(["one turn"])[0]
    assert probs[0].tolist() == pytest.approx([direct["b"], direct["a"], direct["c"]], abs=1e-5)


def _validation(router):
    texts = {"the meal was lovely": "sentiment", "bank shares drop": "topic",
             "hi there friend": "chat", "awful phone": "sentiment", "league final tonight": "topic",
             # words no route example has: the first stage cannot know, the adapter may
             "zebra quantum": "topic", "xylophone marmalade": "sentiment", "okapi fjord": "chat"}
    return [(t, a, "data") for t, a in texts.items()] + [("hello again", "chat", "hand-written")]


def test_fit_keeps_the_first_stage_alone_when_the_adapter_is_wrong():
    router = make_router(chat_route=True)
    pairs = _validation(router)
    wrong = {t: next(r for r in router.routes if r != a) for t, a, _ in pairs}
    fitted = fit_stage(router, SecondStage(Oracle(router.routes, wrong, sure=1.0), 1.0, 0.5), pairs)
    assert fitted["gate"] == 0.0 and fitted["accuracy"] == fitted["first_stage"]["accuracy"]
    assert fitted["adapter_alone"] == 0.0


def test_fit_asks_a_right_adapter_and_prefers_the_lower_gate():
    router = make_router(chat_route=True)
    pairs = _validation(router)
    right = SecondStage(Oracle(router.routes, {t: a for t, a, _ in pairs}, sure=1.0), 1.0, 0.5)
    fitted = fit_stage(router, right, pairs)
    assert fitted["adapter_alone"] == 1.0 and fitted["accuracy"] == 1.0
    assert fitted["first_stage"]["accuracy"] < 1.0 and fitted["gate"] > 0
    # no lower gate on the grid reaches the same accuracy
    assert all(r["accuracy"] < 1.0 for r in fitted["grid"] if r["gate"] < fitted["gate"])
    # hand-written turns weigh HANDWRITTEN_SHARE of the objective, however few they are
    w = route_data.pair_weights(np.array([a for _, a, _ in pairs]), np.array([s for _, _, s in pairs]))
    assert w[-1] == pytest.approx(route_data.HANDWRITTEN_SHARE) and w.sum() == pytest.approx(1)


def test_attach_only_when_the_stage_fits_these_routes(tmp_path, caplog):
    router = make_router(chat_route=True)
    folder = router_folder.folder_of(tmp_path)
    assert attach(router, None, tmp_path) is None  # nothing trained: silent, first stage alone
    folder.mkdir(parents=True)
    caplog.set_level(logging.INFO, logger="bot.routing.second")
    # a stage that knows fewer than two of the router's routes cannot help (see test_add_flow.py
    # for one fitted for some of them)
    for stage, why in [({"routes": ["sentiment", "weather"], "gate": 0.9, "weight": 0.5}, "fitted for the routes"),
                       ({"routes": router.routes, "gate": 0.0, "weight": 0.5}, "did not help"),
                       ({"routes": router.routes, "gate": 0.9, "weight": 0.5}, "adapter.yaml"),
                       ({"routes": router.routes, "weight": 0.5}, "unreadable (KeyError"),
                       ("{half a file", "unreadable (JSONDecodeError")]:
        (folder / "stage.json").write_text(stage if isinstance(stage, str) else json.dumps(stage))
        caplog.clear()
        assert attach(router, make_tiny_backbone(), tmp_path) is None and router.second is None
        assert why in caplog.text and "bot train-router" in caplog.text


def test_status_line_for_bot_list(tmp_path):
    from bot.routing.second import status

    assert status(tmp_path, ["a", "b"]).startswith("none")
    folder = router_folder.folder_of(tmp_path)
    folder.mkdir(parents=True)
    stage = {"routes": ["a", "b"], "gate": 0.9, "accuracy": 0.95, "first_stage": {"accuracy": 0.9},
             "date": "2026-11-29 15:51"}
    (folder / "stage.json").write_text(json.dumps(stage))
    assert status(tmp_path, ["b", "a"]) == ("validation 90.0 -> 95.0 %, asked when the first stage's best "
                                            "score is below 0.90 (fitted 2026-11-29 15:51)")
    assert "Fix: bot train-router" in status(tmp_path, ["a", "b", "c"])
    (folder / "stage.json").write_text("{not json")
    assert "unreadable" in status(tmp_path, ["a", "b"])


def _two_routes(root):
    """Two classify adapters with their own CSVs under ``root`` (enough rows to split)."""
    for name, words in (("pets", ["cat", "dog"]), ("food", ["soup", "bread"])):
        folder = root / name
        folder.mkdir(parents=True)
        rows = ["text,label"] + [f"{words[i % 2]} number {i},{words[i % 2]}" for i in range(40)]
        (folder / "data.csv").write_text("\n".join(rows) + "\n")
        (folder / "adapter.yaml").write_text(
            f"name: {name}\nkind: classify\nlabels: {words}\n"
            "data: {path: data.csv, text_col: text, label_col: label}\ntemplate: '{text}'\n"
            f"route_examples: ['{words[0]} please']\n")


def test_a_failed_retrain_leaves_the_previous_route_adapter_whole(tmp_path, monkeypatch):
    import bot.training.second_stage
    from bot.training.second_stage import train_router

    _two_routes(tmp_path)
    folder = router_folder.folder_of(tmp_path)
    folder.mkdir(parents=True)
    before = {"adapter.yaml": "name: router\n# the previous one\n", "routes.csv": "text,label\nold,pets\n"}
    for name, text in before.items():
        (folder / name).write_text(text)
    seen = {}

    def crash(spec, backbone, out_dir, **_):
        seen["rows"] = (spec.folder / "routes.csv").read_text().count("\n")
        seen["labels"], seen["out"] = spec.labels, out_dir
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(bot.training.second_stage, "train_adapter", crash)
    with pytest.raises(RuntimeError, match="killed"):
        train_router(tmp_path, backbone=None)
    assert {f.name: f.read_text() for f in folder.iterdir()} == before
    assert seen["out"] == folder and sorted(seen["labels"]) == ["food", "pets"] and seen["rows"] > 10
    # no staging folder left (the lock file stays, as every adapter's does)
    assert sorted(p.name for p in folder.parent.iterdir()) == [".router.lock", "router"]


def test_route_training_stops_by_the_same_rule_as_every_classify_adapter(tmp_path):
    import json

    from bot.training.second_stage import train_router

    _two_routes(tmp_path)
    train_router(tmp_path, backbone=make_tiny_backbone())
    metrics = json.loads((router_folder.folder_of(tmp_path) / "metrics.json").read_text())
    assert metrics["stop_reason"] and metrics["validation"]  # validation checks ran
    assert metrics["budget_minutes"] == 20 and metrics["patience"] == 3
    assert metrics["steps"] <= metrics["planned_steps"]
