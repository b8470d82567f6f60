"""`bot add --train`, `bot rm`, retraining and the route-change report, on the tiny model.

The router runs on the bag-of-words HashEncoder of tests/helpers.py (milliseconds, and its
similarities follow the words): each toy route has its own words, so which turns move when a
route is added is known in advance.
"""

from __future__ import annotations

import json

import pytest
from helpers import HashEncoder, make_tiny_backbone, route_csv, route_spec, tree

from bot.manifests import versions
from bot.manifests.addflow import add_and_train, own_score_drop, remove_route, retrain_report
from bot.manifests.spec import AdapterSpec, discover
from bot.routing import changes
from bot.training.train import train_adapter


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Two trained routes (pets, food) under tmp/adapters; the router cache in tmp/cache."""
    monkeypatch.setenv("BOT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "adapters"
    bb = make_tiny_backbone()
    for route in ("pets", "food"):
        spec = route_spec(root, route)
        train_adapter(spec, bb, spec.folder)
    return root, bb


def add(root, bb, route, tmp_path, **kw):
    csv = route_csv(tmp_path / f"new-{route}.csv", route, seed=1)
    return add_and_train(name=route, source=csv, adapters_dir=root, backbone=bb, encoder=HashEncoder(),
                         eval_examples=None, **kw)


@pytest.mark.slow
def test_add_train_reports_every_route_and_proves_the_others_untouched(world, tmp_path):
    root, bb = world
    digests = {n: changes.weight_digest(root / n) for n in ("pets", "food")}
    before = tree(root)
    report = add(root, bb, "weather", tmp_path)
    assert report["applied"] and (root / "weather" / "adapter_model.safetensors").is_file()
    assert report["routes_before"] == ["food", "pets"] and report["routes_after"] == ["food", "pets", "weather"]
    per = report["router"]["per_route"]
    assert per["weather"]["status"] == "new" and per["weather"]["before"] is None
    assert per["weather"]["after"] >= 0.8  # its own words: its held-out turns reach it
    for route in ("pets", "food"):  # distinct words: nothing is taken from them
        assert per[route]["n"] > 0 and per[route]["change_points"] >= -changes.DROP_POINTS
    assert report["drops"] == {} and report["warnings"] == []
    for n in ("pets", "food"):
        a = report["adapters"][n]
        assert a["unchanged"] and a["digest_before"] == a["digest_after"] == digests[n]
        assert a["score_before"] == a["score_after"] and "text" in a["score_before"]
    assert report["adapters"]["weather"]["digest_before"] is None
    # every held-out turn of the new route, routed: right adapter and right label
    routed = report["new_adapter"]["routed"]["text"]
    metrics = json.loads((root / "weather" / "metrics.json").read_text())
    assert routed["oracle_accuracy"] == pytest.approx(metrics["heldout"]["text"]["accuracy"])
    assert routed["routed_accuracy"] <= routed["oracle_accuracy"]
    assert routed["n"] == metrics["heldout"]["text"]["n"]
    md = (root / ".changes").glob("*-add-weather.md")
    text = next(md).read_text()
    assert "| weather |" in text and "unchanged (same weights)" in text and "Routed end to end" in text
    # nothing but the new folder (and bookkeeping) appeared
    after = tree(root)
    assert {k: v for k, v in after.items() if not k.startswith("weather/")} == before
    # and rolling back puts every file back as it was
    done = versions.rollback(root, "weather")
    assert done["absent"] and not (root / "weather").exists() and tree(root) == before


@pytest.mark.slow
def test_strict_refuses_a_route_that_takes_turns_away_and_changes_nothing(world, tmp_path):
    root, bb = world
    before = tree(root)
    report = add(root, bb, "animals", tmp_path, strict=True)
    assert not report["applied"] and "pets" in report["drops"] and report["drops"]["pets"] > 1
    assert "REFUSED" in changes.render(report) and "pets" in report["refused"]
    assert not (root / "animals").exists() and tree(root) == before
    assert any(".trash" in str(p) for p in root.glob(".trash/animals-*"))  # kept, not deleted
    warning = report["warnings"][0]
    assert warning.startswith("route 'pets' lost") and "-> animals" in warning
    moved = report["router"]["moved"]
    assert moved and all(t["before"] != t["after"] for t in moved)
    assert any(t["true"] == "pets" and t["after"] == "animals" for t in moved)
    # without --strict the same change goes through, with the warning
    report = add(root, bb, "animals", tmp_path)
    assert report["applied"] and report["warnings"] and (root / "animals").is_dir()


@pytest.mark.slow
def test_rm_reports_and_moves_to_the_trash(world, tmp_path):
    root, bb = world
    add(root, bb, "weather", tmp_path)
    before = tree(root)
    report = remove_route(name="weather", adapters_dir=root, encoder=HashEncoder())
    assert report["applied"] and not (root / "weather").exists()
    assert report["router"]["per_route"]["weather"]["status"] == "removed"
    assert all(a["unchanged"] for n, a in report["adapters"].items() if n != "weather")
    assert list(root.glob(".trash/weather-*"))
    versions.rollback(root, "weather")
    assert tree(root) == before


@pytest.mark.slow
def test_retraining_keeps_the_previous_version_and_reports_the_router_unchanged(world):
    root, bb = world
    spec = AdapterSpec.from_dir(root / "pets")
    old = tree(root / "pets")
    train_adapter(spec, bb, spec.folder, epochs=1.0)
    report = retrain_report(name="pets", adapters_dir=root)
    assert report["router"]["same"] and report["router"]["n_moved"] == 0
    assert report["adapters"]["food"]["unchanged"] and not report["adapters"]["pets"]["unchanged"]
    assert "Router: unchanged" in changes.render(report)
    (kept,) = versions.list_versions(root / "pets")
    assert tree(kept["source"]) == old
    versions.rollback(root, "pets")
    assert tree(root / "pets") == old


def test_own_score_drop_compares_equal_sized_views_only():
    old = {"heldout": {"text": {"accuracy": 0.90, "n": 100}, "headline": {"accuracy": 0.8, "n": 50}}}
    new = {"heldout": {"text": {"accuracy": 0.85, "n": 100}, "headline": {"accuracy": 0.5, "n": 40}}}
    assert own_score_drop(old, new) == "text 90.0 -> 85.0 % (n=100)"
    assert own_score_drop(old, old) == ""
    assert "+5.0%" in own_score_drop({"heldout": {"ppl_adapter": 20.0}}, {"heldout": {"ppl_adapter": 21.0}})


@pytest.mark.slow
def test_cli_add_train_prints_one_report(world, tmp_path, monkeypatch, capsys):
    from bot.cli import main

    root, bb = world
    monkeypatch.setattr("bot.model.backbone.Backbone.load", classmethod(lambda cls, name=None, **kw: bb))
    monkeypatch.setattr("bot.routing.encoder.load_encoder", lambda *a, **k: HashEncoder())
    csv = route_csv(tmp_path / "w.csv", "weather", seed=2)
    assert main(["add", "weather", "--from", str(csv), "--adapters-dir", str(root), "--strict"]) == 2
    assert "--train" in capsys.readouterr().err
    assert main(["add", "weather", "--from", str(csv), "--adapters-dir", str(root), "--train",
                 "--eval-examples", "10"]) == 0
    out = capsys.readouterr().out
    assert "# Route set change: add weather" in out and "| pets |" in out and "report written to" in out
    assert main(["list", "--adapters-dir", str(root)]) == 0
    assert "previous 1: " in capsys.readouterr().out  # weather: "did not exist"
    assert main(["rm", "weather", "--adapters-dir", str(root)]) == 0
    assert "# Route set change: rm weather" in capsys.readouterr().out
    assert "weather" not in [s.name for s in discover(root)]
    assert main(["rollback", "weather", "--adapters-dir", str(root)]) == 0
    assert "weather" in [s.name for s in discover(root)]


@pytest.mark.slow
def test_a_server_routes_over_a_loaded_adapter_with_the_report(world, tmp_path):
    """What /v1/load_lora_adapter calls once the adapter is loaded (bot.serve.api wires it)."""
    from types import SimpleNamespace

    root, bb = world
    specs = discover(root)
    unloaded = []
    state = SimpleNamespace(router=changes.served_router(specs, root, None, HashEncoder()), backbone=None,
                            tasks={s.name: SimpleNamespace(spec=s) for s in specs},
                            unload_adapter=lambda name: (unloaded.append(name), state.tasks.pop(name)))
    for route in ("weather", "animals"):
        spec = route_spec(root, route)
        train_adapter(spec, bb, spec.folder)
    first = state.router
    state.tasks["animals"] = SimpleNamespace(spec=AdapterSpec.from_dir(root / "animals"))
    report = changes.on_adapter_loaded(state, "animals", strict=True)
    assert not report["applied"] and "pets" in report["drops"] and unloaded == ["animals"]
    assert state.router is first and "animals" not in state.tasks
    state.tasks["weather"] = SimpleNamespace(spec=AdapterSpec.from_dir(root / "weather"))
    report = changes.on_adapter_loaded(state, "weather", strict=True)
    assert report["applied"] and state.router is not first and "weather" in state.router.routes
    assert report["router"]["per_route"]["weather"]["status"] == "new"
    assert all(a["unchanged"] for n, a in report["adapters"].items() if n != "weather")
    assert len(list(root.glob(".changes/*-load-*.md"))) == 2


@pytest.mark.slow
def test_cli_train_again_prints_the_report_and_strict_rolls_a_worse_version_back(world, monkeypatch, capsys):
    from bot.cli import main

    root, bb = world
    monkeypatch.setattr("bot.model.backbone.Backbone.load", classmethod(lambda cls, name=None, **kw: bb))
    first = tree(root / "pets")
    assert main(["train", "pets", "--adapters-dir", str(root), "--epochs", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "# Route set change: train pets" in out and "Router: unchanged" in out
    assert "| pets |" in out and "retrained" in out and "| food |" in out
    retrained = tree(root / "pets")
    assert retrained != first and len(versions.list_versions(root / "pets")) == 1
    # a much shorter run scores worse on pets' held-out split: --strict puts the last version back
    monkeypatch.setattr("bot.manifests.addflow.own_score_drop", lambda old, new: "text 100.0 -> 50.0 % (n=18)")
    assert main(["train", "pets", "--adapters-dir", str(root), "--epochs", "0.1", "--strict"]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "own held-out score fell" in out
    assert tree(root / "pets") == retrained
