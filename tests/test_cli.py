"""The CLI is a thin map: every subcommand is listed and reachable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bot.cli import build_parser, main

COMMANDS = ["train", "add", "eval", "chat", "list", "info", "bench", "demo"]


def test_help_lists_every_subcommand():
    text = build_parser().format_help()
    for cmd in COMMANDS:
        assert cmd in text


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "bot.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "train" in out and "demo" in out


def test_unknown_adapter_gives_error_code_and_message(tmp_path, capsys):
    assert main(["train", "ghost", "--adapters-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ghost" in err and "adapter.yaml does not exist" in err


def test_list_shows_untrained_adapters(tmp_path, capsys):
    from bot.spec import AdapterSpec

    AdapterSpec(name="todo", kind="classify", labels=["a", "b"], description="later").save(tmp_path / "todo")
    assert main(["list", "--adapters-dir", str(tmp_path)]) == 0
    assert "not trained yet" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as done:
        main([cmd, "--help"])
    assert done.value.code == 0
    assert "--backbone" in capsys.readouterr().out


def test_info_reports_backbone_adapters_and_memory(tmp_path, monkeypatch, capsys):
    from conftest import make_tiny_backbone
    from test_train import toy_spec

    from bot.train import train_adapter

    spec = toy_spec(tmp_path, epochs=1.0)
    train_adapter(spec, make_tiny_backbone(), spec.folder)
    monkeypatch.setattr("bot.backbone.Backbone.load", classmethod(lambda cls, name=None, **kw: make_tiny_backbone()))
    assert main(["info", "--adapters-dir", str(spec.folder.parent)]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama@" in out and "parameters" in out and "MB resident" in out
    assert "pets" in out and "classify" in out
