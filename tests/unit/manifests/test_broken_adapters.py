"""A hostile but fair user (issue 9): every report of this kind gets a test here.

Sections follow the issue: 1 one bad adapter, 2 `bot add --force`, 3 user files,
4 unchecked values, 5 the cache, 6 bare commands. Tests use the tiny model and temp files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, HashEncoder, make_tiny_backbone, toy_csv, toy_spec

from bot.cli import main
from bot.errors import BotError, DataError, SpecError
from bot.manifests.data import load_user_file, read_table
from bot.manifests.registry import load_all
from bot.manifests.spec import AdapterSpec

ROOT = REPO


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One trained classify adapter folder ('pets'); tests copy it, never change it."""
    from bot.training.train import train_adapter

    base = tmp_path_factory.mktemp("trained")
    spec = toy_spec(base, epochs=0.5)
    train_adapter(spec, make_tiny_backbone(), spec.folder)
    return spec.folder


def adapters_with(tmp_path, trained, *names) -> Path:
    """An adapters/ folder holding copies of the trained adapter under ``names`` (same manifest name)."""
    root = tmp_path / "adapters"
    for name in names:
        shutil.copytree(trained, root / name)
    return root


def edit_manifest(folder: Path, **changes) -> None:
    import yaml

    raw = yaml.safe_load((folder / "adapter.yaml").read_text())
    raw.update(changes)
    (folder / "adapter.yaml").write_text(yaml.safe_dump(raw))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


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
    write(folder / "adapter.yaml", json.dumps({"name": "x", "kind": "classify", key: value}))
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
    write(root / "broken" / "adapter.yaml", "name: [unclosed\n")
    assert main(["list", "--adapters-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "pets" in out and "accuracy" in out
    assert "broken" in out and "FAILED" in out and "not valid YAML" in out


def test_1_eval_of_another_adapter_ignores_a_broken_manifest(tmp_path, trained, monkeypatch, capsys):
    root = adapters_with(tmp_path, trained, "pets")
    (root / "broken").mkdir()
    write(root / "broken" / "adapter.yaml", "name: broken\nkind: classify\ncolour: red\n")
    monkeypatch.setattr("bot.model.backbone.Backbone.load", classmethod(lambda cls, name=None, **kw: make_tiny_backbone()))
    code = main(["eval", "pets", "--adapters-dir", str(root), "--out", str(tmp_path / "rep"),
                 "--max-examples", "8", "--no-router"])
    assert code == 0
    report = json.loads((tmp_path / "rep" / "eval.json").read_text())
    assert report["tasks"]["pets"]["status"] == "ok" and "broken" not in report["tasks"]


def test_1_eval_of_a_broken_adapter_reports_it_failed(tmp_path, trained, monkeypatch, capsys):
    root = adapters_with(tmp_path, trained, "pets")
    (root / "broken").mkdir()
    write(root / "broken" / "adapter.yaml", "name: [unclosed\n")
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


# ================================================================ 3 user files
def test_3_quoted_newlines_are_kept(tmp_path):
    path = write(tmp_path / "d.csv", 'text,label\n"first line\nsecond line",a\r\n"x\r\ny",b\n')
    rows, _ = read_table(path)
    assert [r["text"] for r in rows] == ["first line\nsecond line", "x\r\ny"]


def test_3_u2028_and_form_feed_stay_inside_the_field_with_true_line_numbers(tmp_path):
    text = 'text,label\nsee\u2028you,a\npage\x0cbreak,b\n"two\nlines",a\nempty label,\n'
    path = write(tmp_path / "d.csv", text)
    rows, _ = read_table(path)
    assert [r["text"] for r in rows[:2]] == ["see\u2028you", "page\x0cbreak"]
    assert len(rows) == 4


def test_3_empty_cell_error_names_the_physical_line(tmp_path, capsys):
    text = 'text,label\nsee\u2028you,a\npage\x0cbreak,b\n"two\nlines",a\nempty label,\n'
    path = write(tmp_path / "d.csv", text)
    assert main(["add", "x", "--from", str(path), "--adapters-dir", str(tmp_path / "a")]) == 2
    assert "empty 'label' (line 6)" in capsys.readouterr().err


@pytest.mark.parametrize("zero, one", [("0", "1"), ("false", "true"), ("0", "1.0")])
def test_3_json_labels_zero_false_and_numbers_are_labels(tmp_path, zero, one):
    lines = [f'{{"text": "row {i}", "label": {zero if i % 2 else one}}}' for i in range(12)]
    path = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    rows = load_user_file(path, "classify")
    assert len(rows) == 12
    assert {r["label"] for r in rows} == {zero, one.replace(".0", "")}


def test_3_numeric_labels_1_and_1_0_are_one_class(tmp_path):
    lines = [f'{{"text": "t{i}", "label": {["1", "1.0", "0", "0.0"][i % 4]}}}' for i in range(20)]
    path = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    assert sorted({r["label"] for r in load_user_file(path, "classify")}) == ["0", "1"]
    csv = write(tmp_path / "d.csv", "text,label\n" + "".join(f"t{i},{['1', '1.0'][i % 2]}\n" for i in range(6)))
    assert {r["label"] for r in load_user_file(csv, "classify")} == {"1"}


def test_3_json_labels_accepted_by_add(tmp_path):
    lines = [f'{{"text": "row {i}", "label": {i % 2}}}' for i in range(12)]
    path = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    assert main(["add", "x", "--from", str(path), "--adapters-dir", str(tmp_path / "a")]) == 0
    assert AdapterSpec.from_dir(tmp_path / "a" / "x").labels == ["0", "1"]


def test_3_truncated_json_array_is_a_data_error_with_line_and_column(tmp_path):
    path = write(tmp_path / "d.json", '[\n {"text": "a", "label": "x"},\n {"text": "b", "lab')
    with pytest.raises(DataError) as err:
        read_table(path)
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and "column" in msg and "Fix:" in msg


def test_3_nan_is_not_json(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": NaN}\n')
    with pytest.raises(DataError, match="line 1"):
        read_table(path)


def test_3_symlink_outside_the_data_is_refused_without_echo(tmp_path, capsys):
    secret = tmp_path / "private" / "secret.txt"
    secret.parent.mkdir()
    write(secret, "TOPSECRET-FIRST-LINE\nhunter2\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "pets.csv").symlink_to(secret)
    with pytest.raises(DataError) as err:
        read_table(data / "pets.csv")
    assert "TOPSECRET" not in str(err.value) and "symbolic link" in str(err.value)
    assert main(["add", "x", "--from", str(data / "pets.csv"), "--adapters-dir", str(tmp_path / "a")]) == 2
    captured = capsys.readouterr()
    assert "TOPSECRET" not in captured.err + captured.out and "symbolic link" in captured.err


def test_3_symlink_inside_the_same_folder_is_fine(tmp_path):
    real = toy_csv(tmp_path / "real.csv", n=20)
    (tmp_path / "link.csv").symlink_to(real)
    assert len(read_table(tmp_path / "link.csv")[0]) == 20


@pytest.mark.parametrize("target, words", [("folder", "is a folder"), ("/dev/null", "is not a regular file")])
def test_3_from_a_folder_or_device_says_what_it_is(tmp_path, capsys, target, words):
    path = tmp_path if target == "folder" else Path(target)
    assert main(["add", "x", "--from", str(path), "--adapters-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert words in err and "does not exist" not in err


def test_3_extra_cells_are_refused_with_line_and_column(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\nhello,a\nhello, world,b\n")
    with pytest.raises(DataError) as err:
        read_table(path)
    assert "line 3" in str(err.value) and "column 3" in str(err.value) and "Fix:" in str(err.value)


def test_3_duplicate_header_names_are_refused(tmp_path):
    path = write(tmp_path / "d.tsv", "text\tlabel\ttext\nhi\ta\tho\n")
    with pytest.raises(DataError) as err:
        read_table(path)
    msg = str(err.value)
    assert "line 1" in msg and "'text'" in msg and "columns 1 and 3" in msg


def test_3_unclosed_quote_is_refused_not_glued(tmp_path):
    path = write(tmp_path / "d.csv", 'text,label\n"oops,a\nnext,b\nlast,a\n')
    with pytest.raises(DataError) as err:
        read_table(path)
    assert "line 2" in str(err.value) and "quote" in str(err.value)


# ================================================================ 4 unchecked values
def test_4_negative_epochs_refused_before_any_work(tmp_path, trained, monkeypatch, capsys):
    from bot import cli

    root = adapters_with(tmp_path, trained, "pets")
    before = (root / "pets" / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(cli, "_backbone", lambda args: pytest.fail("loaded the backbone"))
    assert main(["train", "pets", "--adapters-dir", str(root), "--epochs", "-1"]) == 2
    assert "--epochs" in capsys.readouterr().err
    assert (root / "pets" / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.parametrize("flag, value", [("--epochs", "inf"), ("--epochs", "nan"), ("--epochs", "0"),
                                         ("--epochs", "1000"), ("--max-examples", "-5"),
                                         ("--max-examples", "0"), ("--eval-examples", "0")])
def test_4_out_of_range_flags_are_refused(tmp_path, trained, monkeypatch, capsys, flag, value):
    from bot import cli

    root = adapters_with(tmp_path, trained, "pets")
    monkeypatch.setattr(cli, "_backbone", lambda args: pytest.fail("loaded the backbone"))
    assert main(["train", "pets", "--adapters-dir", str(root), flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Fix:" in err and "Traceback" not in err


def test_4_train_adapter_refuses_bad_values_from_python(tmp_path, trained):
    from bot.training.train import train_adapter

    spec = AdapterSpec.from_dir(adapters_with(tmp_path, trained, "pets") / "pets")
    for kwargs in ({"epochs": -1.0}, {"epochs": float("nan")}, {"max_examples": -5}, {"eval_examples": 0}):
        with pytest.raises(SpecError):
            train_adapter(spec, make_tiny_backbone(), spec.folder, **kwargs)


@pytest.mark.parametrize("section, key, value", [
    ("train", "max_length", 10**12), ("train", "epochs", float("inf")), ("train", "epochs", 101),
    ("lora", "r", 10**9), ("train", "batch_size", 10**9), ("train", "learning_rate", 5.0),
    ("train", "head_lr", float("nan")), ("lora", "alpha", float("inf")), ("train", "max_examples", 0),
    ("train", "view_repeats", -1), ("train", "view_repeats", 2.5), ("train", "view_repeats", True),
    ("train", "view_repeats", {"headline": 101}), ("train", "view_repeats", {"headline": "2"}),
])
def test_4_manifest_values_out_of_range_are_refused(tmp_path, section, key, value):
    import yaml

    folder = tmp_path / "x"
    folder.mkdir()
    write(folder / "adapter.yaml", yaml.safe_dump({"name": "x", "kind": "classify", section: {key: value}}))
    with pytest.raises(SpecError) as err:
        AdapterSpec.from_dir(folder)
    msg = str(err.value)
    assert str(folder / "adapter.yaml") in msg and f"'{section}.{key}'" in msg and "Fix:" in msg


def test_4_max_length_beyond_the_backbone_context_is_refused_before_training(tmp_path, trained):
    from bot.training.train import train_adapter

    root = adapters_with(tmp_path, trained, "pets")
    spec = AdapterSpec.from_dir(root / "pets")
    spec = spec.replace(train=spec.train.__class__(**{**spec.train.__dict__, "max_length": 4096}))
    before = (root / "pets" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(SpecError, match="max_length.*512"):
        train_adapter(spec, make_tiny_backbone(), spec.folder)
    assert (root / "pets" / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.parametrize("name", ["x" * 300, "help", "Help", "__base__", "auto", "base", "1abc", "a b",
                                  "../up", "", "é"])
def test_4_bad_and_reserved_adapter_names_are_refused(name):
    from bot.manifests.spec import check_adapter_name

    with pytest.raises(SpecError) as err:
        check_adapter_name(name, "somewhere")
    assert "somewhere" in str(err.value) and "Fix:" in str(err.value)


def test_4_name_rule_is_the_same_everywhere(tmp_path, capsys):
    from bot.manifests.spec import check_adapter_name
    from bot.routing import Router

    check_adapter_name("a" * 64)
    check_adapter_name("topic-2_b")
    src = toy_csv(tmp_path / "d.csv")
    for name in ("x" * 300, "help", "__base__"):
        assert main(["add", name, "--from", str(src), "--adapters-dir", str(tmp_path / "a")]) == 2
        assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(SpecError):
        AdapterSpec(name="help", kind="classify")
    with pytest.raises(BotError):
        make_tiny_backbone().add_adapter("__base__", AdapterSpec(name="ok", kind="classify").lora.to_peft())
    with pytest.raises(ValueError):
        Router(HashEncoder()).add_route("auto", ["hello"])


def _hold_lock(folder: Path):
    code = ("import sys, time; from bot.util.fsutil import adapter_lock\n"
            "with adapter_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_4_second_train_of_the_same_adapter_refuses_and_names_the_holder(tmp_path, trained, monkeypatch, capsys):
    from bot import cli

    root = adapters_with(tmp_path, trained, "pets")
    monkeypatch.setattr(cli, "_backbone", lambda args: pytest.fail("loaded the backbone"))
    proc = _hold_lock(root / "pets")
    try:
        t0 = time.perf_counter()
        assert main(["train", "pets", "--adapters-dir", str(root), "--epochs", "1"]) == 2
        assert time.perf_counter() - t0 < 5  # refuses at once, does not wait
        err = capsys.readouterr().err
        assert f"process {proc.pid}" in err and "pets" in err
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash releases the lock too
        proc.wait()
    from bot.util.fsutil import adapter_lock

    with adapter_lock(root / "pets"):
        pass


# ================================================================ 5 the cache
def _fake_convert(calls):
    def convert(src, gguf, dest):
        import torch
        from safetensors.torch import save_file

        dest.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.zeros(4)}, str(dest / "model.safetensors"))
        (dest / "config.json").write_text("{}")
        calls.append(dest)
    return convert


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_5_broken_cached_backbone_is_rebuilt_with_a_note(tmp_path, monkeypatch, caplog, damage):
    from bot.model import backbone

    monkeypatch.setenv("BOT_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(backbone, "convert_gguf", _fake_convert(calls))
    ref, _, converted = backbone.resolve_backbone("")
    assert converted and len(calls) == 1
    weights = Path(ref) / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes({"empty": b"", "truncated": good[:-7], "garbage": b"x" * 100}[damage])
    with caplog.at_level(logging.WARNING, logger="bot.model.backbone"):
        ref2, _, converted = backbone.resolve_backbone("")
    assert converted and len(calls) == 2 and ref2 == ref
    assert weights.read_bytes() == good
    assert "model.safetensors" in caplog.text and "rebuild" in caplog.text
    assert backbone.resolve_backbone("")[2] is False  # a healthy entry is reused


def test_5_bot_cache_pointing_at_a_file_is_reported_before_conversion(tmp_path, monkeypatch):
    from bot.model import backbone

    cache = write(tmp_path / "cachefile", "not a folder")
    monkeypatch.setenv("BOT_CACHE", str(cache))
    monkeypatch.setattr(backbone, "convert_gguf", lambda *a: pytest.fail("slow work started"))
    with pytest.raises(BotError) as err:
        backbone.resolve_backbone("")
    assert str(cache) in str(err.value) and "BOT_CACHE" in str(err.value) and "Fix:" in str(err.value)


def test_5_unwritable_cache_is_reported_before_conversion(tmp_path, monkeypatch):
    from bot.model import backbone

    if os.geteuid() == 0:  # root ignores permission bits: use a folder no one can create
        if not Path("/sys").is_dir():
            pytest.skip("needs a non-root user or /sys")
        cache = Path("/sys/bot-cache-test")
    else:
        cache = tmp_path / "ro"
        cache.mkdir()
        cache.chmod(0o555)
    monkeypatch.setenv("BOT_CACHE", str(cache))
    monkeypatch.setattr(backbone, "convert_gguf", lambda *a: pytest.fail("slow work started"))
    with pytest.raises(BotError) as err:
        backbone.resolve_backbone("")
    assert str(cache) in str(err.value) and "Fix:" in str(err.value)


# ================================================================ 6 bare commands
def test_6_bare_command_gives_a_usage_hint_and_classifies_nothing(tmp_path, trained, monkeypatch):
    from bot.chat import ChatSession
    from bot.manifests.registry import load_task
    from bot.routing import Router

    bb = make_tiny_backbone()
    task = load_task(bb, AdapterSpec.from_dir(trained))
    router = Router(HashEncoder(), fallback="pets")
    router.add_route("pets", ["meow purr"])
    session = ChatSession(bb, {"pets": task}, router)
    monkeypatch.setattr(ChatSession, "_analyse", lambda *a, **k: pytest.fail("classified the command"))
    turn = session.send("/pets")
    assert "Type a message after /pets" in turn.reply and turn.label_scores is None
    assert session.send("  /PETS  ").reply.startswith("Type a message after /pets")
