"""The chat session (bot.chat): a bare ``/adapter`` command gives a usage hint and classifies nothing
(issue 9, section 6).
"""

from __future__ import annotations

import pytest
from helpers import HashEncoder, make_tiny_backbone

from bot.manifests.spec import AdapterSpec


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
