"""Load adapter folders onto a backbone: each becomes a Task ready to run."""

from __future__ import annotations

import logging
from pathlib import Path

from bot.errors import BotError
from bot.manifests.spec import AdapterSpec, discover, scan
from bot.manifests.versions import recover_adapters
from bot.tasks import task_class

log = logging.getLogger(__name__)


def load_task(backbone, spec: AdapterSpec):
    """Load one adapter folder (LoRA + extras) onto ``backbone``; return its Task.

    Raises:
        AdapterError / FingerprintMismatch with the file named; other adapters keep working.
    """
    folder = Path(spec.folder)
    if spec.kind == "base":  # the bare backbone: no weights to load
        return task_class(spec.kind)(spec, backbone)
    backbone.load_adapter(spec.name, folder, spec.backbone.get("fingerprint"))
    task = task_class(spec.kind)(spec, backbone)
    try:
        task.load_extra(folder)
    except BaseException:
        backbone.drop_adapter(spec.name)
        raise
    return task


def load_all(backbone, adapters_dir, names: list[str] | None = None):
    """Load every adapter under ``adapters_dir`` (or just ``names``).

    A folder swap that a killed ``bot train`` left half done is repaired first (bot.manifests.versions).

    Returns:
        (tasks by name, failures as {name: error message}). One bad adapter never
        stops the others from loading: a broken manifest, a clashing name, bad weights
        or an unexpected error in one folder marks only that folder failed.
    """
    recover_adapters(adapters_dir)  # a save a kill interrupted: finished or undone, and logged
    specs, failures = scan(adapters_dir)
    if names:
        failures = {k: v for k, v in failures.items() if k in names}
    tasks = {}
    for spec in specs:
        if names and spec.name not in names:
            continue
        trained = (spec.folder / "adapter_model.safetensors").exists()
        if spec.kind != "base" and not trained:  # a base route has no weights to train
            failures[spec.name] = f"not trained yet: run `bot train {spec.name}`"
            continue
        try:
            tasks[spec.name] = load_task(backbone, spec)
        except BotError as err:
            failures[spec.name] = str(err)
        except Exception as err:  # a bug or a library surprise in one folder must not stop the rest
            log.exception("adapter %s failed to load", spec.name)
            backbone.drop_adapter(spec.name)
            failures[spec.name] = (f"{spec.folder}: could not be loaded ({type(err).__name__}: "
                                   f"{str(err)[:300]}). Fix: retrain it with `bot train {spec.name}`")
    return tasks, failures


__all__ = ["load_task", "load_all", "discover"]
