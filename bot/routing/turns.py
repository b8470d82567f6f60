"""Labelled chat turns: the one reader of ``{"text": ..., "adapter": ...}`` JSONL files.

``chat_turns.jsonl`` beside this module holds hand-written turns (chat, sentiment, topic);
``bot eval`` adds them to the router's test set and the tests use them as held-out turns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from bot.errors import DataError

HANDWRITTEN = Path(__file__).with_name("chat_turns.jsonl")


def load_turns(path) -> list[tuple[str, str]]:
    """Read a JSONL file of ``{"text": ..., "adapter": ...}`` rows as ``(text, adapter)`` pairs."""
    pairs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read the turns file {path} ({err})") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append((str(row["text"]), str(row["adapter"])))
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"{path}:{number}: expected a JSON object with 'text' and 'adapter' ({err})"
            ) from err
    return pairs


def load_handwritten(names: set[str] | None = None) -> list[tuple[str, str]]:
    """The hand-written turns whose adapter is in ``names`` (all when None)."""
    return [(t, a) for t, a in load_turns(HANDWRITTEN) if names is None or a in names]


def as_pairs(labelled) -> list[tuple[str, str]]:
    """Accept ``{adapter: [texts]}``, ``[(text, adapter)]`` or ``[{"text", "adapter"}]``."""
    if isinstance(labelled, Mapping):
        return [(text, name) for name, texts in labelled.items() for text in texts]
    pairs = []
    for row in labelled:
        if isinstance(row, Mapping):
            pairs.append((row["text"], row["adapter"]))
        else:
            text, name = row
            pairs.append((text, name))
    return pairs
