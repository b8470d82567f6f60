"""Task kinds, registered by name: ``classify``, ``generate`` and ``base`` (no adapter).

A task kind knows how to train an adapter of its kind, run it, evaluate it and save
whatever it keeps beside the LoRA weights (a classifier head, say). New kinds plug in
with ``register_task`` (bot.tasks.kinds) and need no change elsewhere. Importing this
package registers the built-in kinds.
"""

from __future__ import annotations

from bot.tasks import bare, classify, generate  # noqa: F401  (registers the built-in kinds)
from bot.tasks.kinds import TASKS, register_task, task_class

__all__ = ["TASKS", "register_task", "task_class"]
