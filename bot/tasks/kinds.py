"""The task-kind registry: each kind's class under its name (``classify``, ``generate``, ``base``)."""

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
