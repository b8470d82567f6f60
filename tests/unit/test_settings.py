"""bot.settings: the one place that reads BOT_* variables, and `bot info` lists them."""

from __future__ import annotations

import re

import pytest
from helpers import REPO

from bot import settings
from bot.errors import BotError
from bot.model.info import settings_lines

ROOT = REPO
READ = re.compile(r"""(environ\.get\(|getenv\(|environ\[)\s*["'](BOT_[A-Z0-9_]+)["']\s*\)?(?!\s*=[^=])""")
NAMED = re.compile(r"""["'](BOT_[A-Z0-9_]+)["']""")


def _sources():
    for folder in ("bot", "demo"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name != "settings.py":
                yield path, path.read_text(encoding="utf-8")


def test_no_module_but_settings_reads_a_bot_variable():
    readers = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p, text in _sources()
               for m in READ.finditer(text)]
    assert readers == []


def test_every_bot_variable_the_code_names_is_in_the_table():
    named = {m.group(1) for _, text in _sources() for m in NAMED.finditer(text)}
    assert named and named <= set(settings.SETTINGS), named - set(settings.SETTINGS)


def test_get_returns_the_table_default_then_the_environment(monkeypatch):
    monkeypatch.delenv("BOT_DEVICE", raising=False)
    assert settings.get("BOT_DEVICE") == "auto"
    monkeypatch.setenv("BOT_DEVICE", " cpu ")
    assert settings.get("BOT_DEVICE") == "cpu"
    monkeypatch.setenv("BOT_DEVICE", "  ")
    assert settings.get("BOT_DEVICE") == "auto"  # blank = unset
    with pytest.raises(KeyError, match="not a bot setting"):
        settings.get("BOT_NOPE")


def test_get_int_names_the_variable_when_it_is_not_a_number(monkeypatch):
    monkeypatch.setenv("BOT_SERVE_PORT", "eight")
    with pytest.raises(BotError, match="BOT_SERVE_PORT='eight' is not a number"):
        settings.get_int("BOT_SERVE_PORT")
    monkeypatch.setenv("BOT_SERVE_PORT", "9000")
    assert settings.get_int("BOT_SERVE_PORT") == 9000


def test_override_puts_back_what_was_there(monkeypatch):
    monkeypatch.delenv("BOT_CACHE", raising=False)
    with settings.override("BOT_CACHE", "/tmp/x"):
        assert settings.get("BOT_CACHE") == "/tmp/x"
    assert settings.get("BOT_CACHE") == "~/.cache/bot"


def test_info_lists_every_setting_and_masks_the_api_key(monkeypatch):
    monkeypatch.setenv("BOT_API_KEY", "s3cret-value")
    text = "\n".join(settings_lines())
    assert all(name in text for name in settings.SETTINGS)
    assert "s3cret-value" not in text and "BOT_API_KEY" in text
