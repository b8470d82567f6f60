"""The converted-backbone cache (issue 9, section 5): a broken entry is rebuilt with a note,
and an unusable BOT_CACHE is reported before any conversion starts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from helpers import write_exact

from bot.errors import BotError


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

    cache = write_exact(tmp_path / "cachefile", "not a folder")
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
