"""Task kinds, registered by name: ``classify``, ``generate`` and ``base`` (no adapter).

A task kind knows how to train an adapter of its kind, run it, evaluate it and save
whatever it keeps beside the LoRA weights (a classifier head, say). New kinds plug in
with ``register_task`` and need no change elsewhere.
"""

from __future__ import annotations

TASKS: dict[str, type] = {}


def register_task(name: str, cls: type) -> type:
    """Register a task class under ``name``; duplicates are refused."""
    if name in TASKS:
        raise ValueError(f"task kind '{name}' is already registered ({TASKS[name].__name__})")
    TASKS[name] = cls
    return cls


def task_class(kind: str) -> type:
    if kind not in TASKS:
        raise KeyError(f"unknown task kind '{kind}'; registered: {sorted(TASKS)}")
    return TASKS[kind]


from bot.tasks import bare, classify, generate  # noqa: E402,F401  (registers the built-in kinds)
