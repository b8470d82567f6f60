"""The CLI is a table (bot.cli.COMMANDS): every subcommand is in it, listed and reachable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bot.cli import COMMANDS, build_parser, main

# what the README and docs promise; a command added or removed must change this list too
DOCUMENTED = ["train", "train-router", "add", "rm", "merge", "rollback", "eval", "distill", "chat", "list",
              "info", "bench", "serve", "export", "demo"]


def _subcommands(parser) -> dict:
    action = next(a for a in parser._actions if a.dest == "cmd")
    return action.choices


def test_the_parser_has_exactly_the_tables_subcommands_in_its_order():
    assert list(_subcommands(build_parser())) == list(COMMANDS)
    assert sorted(COMMANDS) == sorted(DOCUMENTED)


def test_top_level_help_lists_each_subcommand_as_a_word_with_its_help():
    text = build_parser().format_help()
    listed = {line.split()[0] for line in text.splitlines() if line.startswith("    ") and line.split()}
    assert set(COMMANDS) <= listed, set(COMMANDS) - listed
    for command in COMMANDS.values():
        assert command.help.split()[0] in text


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_subcommand_help_runs_and_names_its_flags(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: bot {name}")
    assert "--adapters-dir" in out  # every command takes the common flags
    sub = _subcommands(build_parser())[name]
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in out


@pytest.mark.slow
def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "bot.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "train" in out and "demo" in out


def test_unknown_adapter_gives_error_code_and_message(tmp_path, capsys):
    assert main(["train", "ghost", "--adapters-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ghost" in err and "adapter.yaml does not exist" in err


def test_list_shows_untrained_adapters(tmp_path, capsys):
    from bot.manifests.spec import AdapterSpec

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
    from helpers import make_tiny_backbone, toy_spec

    from bot.training.train import train_adapter

    spec = toy_spec(tmp_path, epochs=1.0)
    train_adapter(spec, make_tiny_backbone(), spec.folder)
    monkeypatch.setattr("bot.model.backbone.Backbone.load", classmethod(lambda cls, name=None, **kw: make_tiny_backbone()))
    assert main(["info", "--adapters-dir", str(spec.folder.parent)]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama@" in out and "parameters" in out and "MB resident" in out
    assert "pets" in out and "classify" in out
