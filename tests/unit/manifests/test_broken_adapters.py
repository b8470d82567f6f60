"""One bad adapter never takes the others down, and `bot add --force` keeps what it replaces
(issue 9, sections 1 and 2: a hostile but fair user). Tests use the tiny model and temp files.

The other sections of issue 9 have their own modules: tests/unit/manifests/test_user_files.py (3),
tests/unit/training/test_bad_values.py (4), tests/unit/model/test_backbone_cache.py (5) and
tests/unit/test_chat.py (6).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import (
    HashEncoder,
    adapters_with,
    make_tiny_backbone,
    toy_csv,
    write_exact,
)

from bot.cli import main
from bot.errors import SpecError
from bot.manifests.registry import load_all
from bot.manifests.spec import AdapterSpec


def edit_manifest(folder: Path, **changes) -> None:
    import yaml

    raw = yaml.safe_load((folder / "adapter.yaml").read_text())
    raw.update(changes)
    (folder / "adapter.yaml").write_text(yaml.safe_dump(raw))


# ================================================================ 1 one bad adapter
def test_1_target_modules_matching_nothing_fails_only_that_adapter(tmp_path, trained):
    root = adapters_with(tmp_path, trained, "pets", "odd")
    edit_manifest(root / "odd", name="odd")
    cfg = json.loads((root / "odd" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["no_such_proj"]
    (root / "odd" / "adapter_config.json").write_text(json.dumps(cfg))
    tasks, failures = load_all(make_tiny_backbone(), root)
    assert set(tasks) == {"pets"}
    assert "adapter_config.json" in failures["odd"] and "target_modules" in failures["odd"]
    assert "Fix:" in failures["odd"]


def test_1_chat_session_survives_an_adapter_that_matches_nothing(tmp_path, trained, monkeypatch):
    from bot.chat import ChatSession

    monkeypatch.setenv("BOT_CACHE", str(tmp_path / "cache"))
    root = adapters_with(tmp_path, trained, "pets", "odd")
    edit_manifest(root / "odd", name="odd")
    cfg = json.loads((root / "odd" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["no_such_proj"]
    (root / "odd" / "adapter_config.json").write_text(json.dumps(cfg))
    session = ChatSession.from_dir(make_tiny_backbone(), root, encoder=HashEncoder())
    assert set(session.tasks) == {"pets"} and "odd" in session.failures
    assert session.send("the meow number 3").reply


def test_1_training_with_target_modules_matching_nothing_is_a_clear_error(tmp_path, trained, monkeypatch, capsys):
    from bot import cli

    root = adapters_with(tmp_path, trained, "pets")
    edit_manifest(root / "pets", lora={"r": 4, "target_modules": ["no_such_proj"]})
    monkeypatch.setattr(cli, "_backbone", lambda args: make_tiny_backbone())
    assert main(["train", "pets", "--adapters-dir", str(root), "--epochs", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "'lora.target_modules'" in err and "adapter.yaml" in err and "Fix:" in err


@pytest.mark.parametrize("key, value, words", [
    ("template", "{text} {foo}", ["'template'", "{foo}", "{text}"]),
    ("template", "{text} {}", ["'template'", "{text}"]),
    ("reply_template", "{label} {bogus}", ["'reply_template'", "{bogus}", "{label}", "{score}"]),
    ("reply_template", "{label} {score:.2q}", ["'reply_template'", "score"]),
    ("reply_template", "{label", ["'reply_template'"]),
])
def test_1_template_with_unknown_placeholder_refused_when_manifest_read(tmp_path, key, value, words):
    folder = tmp_path / "x"
    folder.mkdir()
    write_exact(folder / "adapter.yaml", json.dumps({"name": "x", "kind": "classify", key: value}))
    with pytest.raises(SpecError) as err:
        AdapterSpec.from_dir(folder)
    for word in [str(folder / "adapter.yaml"), *words]:
        assert word in str(err.value)


def test_1_bad_template_adapter_fails_alone_and_chat_turns_work(tmp_path, trained, monkeypatch):
    from bot.chat import ChatSession

    monkeypatch.setenv("BOT_CACHE", str(tmp_path / "cache"))
    root = adapters_with(tmp_path, trained, "pets", "odd")
    edit_manifest(root / "odd", name="odd", reply_template="{label} {foo}")
    session = ChatSession.from_dir(make_tiny_backbone(), root, encoder=HashEncoder())
    assert set(session.tasks) == {"pets"} and "reply_template" in session.failures["odd"]
    turn = session.send("the meow number 1")
    assert turn.reply and set(turn.analysis) == {"pets"}


def test_1_unparsable_manifest_listed_as_failed_not_fatal(tmp_path, trained, capsys):
    root = adapters_with(tmp_path, trained, "pets")
    (root / "broken").mkdir()
    write_exact(root / "broken" / "adapter.yaml", "name: [unclosed\n")
    assert main(["list", "--adapters-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "pets" in out and "accuracy" in out
    assert "broken" in out and "FAILED" in out and "not valid YAML" in out


def test_1_eval_of_another_adapter_ignores_a_broken_manifest(tmp_path, trained, monkeypatch, capsys):
    root = adapters_with(tmp_path, trained, "pets")
    (root / "broken").mkdir()
    write_exact(root / "broken" / "adapter.yaml", "name: broken\nkind: classify\ncolour: red\n")
    monkeypatch.setattr("bot.model.backbone.Backbone.load", classmethod(lambda cls, name=None, **kw: make_tiny_backbone()))
    code = main(["eval", "pets", "--adapters-dir", str(root), "--out", str(tmp_path / "rep"),
                 "--max-examples", "8", "--no-router"])
    assert code == 0
    report = json.loads((tmp_path / "rep" / "eval.json").read_text())
    assert report["tasks"]["pets"]["status"] == "ok" and "broken" not in report["tasks"]


def test_1_eval_of_a_broken_adapter_reports_it_failed(tmp_path, trained, monkeypatch, capsys):
    root = adapters_with(tmp_path, trained, "pets")
    (root / "broken").mkdir()
    write_exact(root / "broken" / "adapter.yaml", "name: [unclosed\n")
    monkeypatch.setattr("bot.model.backbone.Backbone.load", classmethod(lambda cls, name=None, **kw: make_tiny_backbone()))
    code = main(["eval", "broken", "pets", "--adapters-dir", str(root), "--out", str(tmp_path / "rep"),
                 "--max-examples", "8", "--no-router"])
    assert code == 0
    report = json.loads((tmp_path / "rep" / "eval.json").read_text())
    assert report["tasks"]["pets"]["status"] == "ok"
    assert report["tasks"]["broken"]["status"] == "failed"
    assert "not valid YAML" in report["tasks"]["broken"]["error"]


def test_1_leftover_tmp_folder_is_never_an_adapter(tmp_path, trained, capsys):
    root = adapters_with(tmp_path, trained, "pets", ".pets.tmp-k3j2x")
    tasks, failures = load_all(make_tiny_backbone(), root)
    assert set(tasks) == {"pets"} and not failures
    assert main(["list", "--adapters-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "tmp" not in out and [ln.split()[0] for ln in out.splitlines() if not ln[:1].isspace()] == ["pets"]


def test_1_copied_folder_with_the_same_name_is_marked_failed(tmp_path, trained, capsys):
    # "a-copy" sorts before "pets": the folder named like the manifest still wins
    root = adapters_with(tmp_path, trained, "pets", "a-copy")
    tasks, failures = load_all(make_tiny_backbone(), root)
    assert set(tasks) == {"pets"} and tasks["pets"].spec.folder == root / "pets"
    msg = failures["a-copy"]
    assert str(root / "a-copy") in msg and str(root / "pets") in msg and "Fix:" in msg
    assert main(["list", "--adapters-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "a-copy" in out and "FAILED" in out


# ================================================================ 2 bot add --force
def test_2_add_force_moves_the_trained_folder_aside(tmp_path, trained, capsys):
    root = adapters_with(tmp_path, trained, "pets")
    old_weights = (root / "pets" / "adapter_model.safetensors").read_bytes()
    src = toy_csv(tmp_path / "new.csv", seed=5)
    assert main(["add", "pets", "--from", str(src), "--adapters-dir", str(root)]) == 2  # no --force
    assert main(["add", "pets", "--from", str(src), "--adapters-dir", str(root), "--force"]) == 0
    err = capsys.readouterr().err  # the move is logged, and the CLI shows log lines on stderr
    assert sorted(p.name for p in (root / "pets").iterdir()) == ["adapter.yaml"]
    moved = list((root / ".trash").glob("pets-*"))
    assert len(moved) == 1 and str(moved[0]) in err
    assert (moved[0] / "adapter_model.safetensors").read_bytes() == old_weights
    assert (moved[0] / "metrics.json").exists() and (moved[0] / "adapter.yaml").exists()
    tasks, failures = load_all(make_tiny_backbone(), root)
    assert not tasks and "not trained" in failures["pets"]
    assert main(["list", "--adapters-dir", str(root)]) == 0
    assert "not trained yet" in capsys.readouterr().out


def test_2_add_into_a_folder_with_stale_files_needs_force(tmp_path, trained):
    root = adapters_with(tmp_path, trained, "pets")
    (root / "pets" / "adapter.yaml").unlink()  # weights and head remain
    src = toy_csv(tmp_path / "new.csv")
    assert main(["add", "pets", "--from", str(src), "--adapters-dir", str(root)]) == 2
    assert not (root / "pets" / "adapter.yaml").exists()
