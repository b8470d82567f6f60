"""Values out of range are refused before any work (issue 9, section 4): `bot train` flags,
manifest values, adapter names, and a second training of an adapter that is being trained.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    REPO,
    HashEncoder,
    adapters_with,
    make_tiny_backbone,
    toy_csv,
    write_exact,
)

from bot.cli import main
from bot.errors import BotError, SpecError
from bot.manifests.spec import AdapterSpec


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
    write_exact(folder / "adapter.yaml", yaml.safe_dump({"name": "x", "kind": "classify", section: {key: value}}))
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
                            text=True, cwd=REPO)
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
