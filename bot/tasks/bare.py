"""``base``: the bare backbone as a route of its own (issue 11's ``assistant``).

No LoRA and no training: the instruct model answers questions and requests as it was
released. The manifest still gives the route its examples, description and route data.
"""

from __future__ import annotations

from bot.errors import SpecError
from bot.tasks.generate import GenerateTask
from bot.tasks.kinds import register_task


class BaseTask(GenerateTask):
    kind = "base"

    @property
    def adapter_name(self) -> None:
        return None

    def fit(self, rows, epochs, seed) -> dict:
        raise SpecError(f"adapter '{self.name}' is kind 'base' (the bare backbone): there is nothing "
                        f"to train. Fix: use it as it is, or set kind: generate to train a LoRA")


register_task("base", BaseTask)
