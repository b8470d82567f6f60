"""Text rules shared by the chat session, the router and the data splits."""

from __future__ import annotations

MAX_CHARS = 2000
"""Longest chat message handled; the session cuts longer ones (with a notice) and the router
embeds no more than this (its encoder keeps only the first 128 tokens anyway)."""


def normalise(text: str) -> str:
    """Lower case with runs of whitespace collapsed: two texts that differ only in case or
    spacing count as the same example (splits, overlap checks, leak checks)."""
    return " ".join(str(text).lower().split())
