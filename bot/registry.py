"""Load adapter folders onto a backbone: each becomes a Task ready to run."""

from __future__ import annotations

from pathlib import Path

from .errors import BotError
from .spec import AdapterSpec, discover
from .tasks import task_class


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

    Returns:
        (tasks by name, failures as {name: error message}). One bad adapter never
        stops the others from loading.
    """
    tasks, failures = {}, {}
    for spec_dir in sorted(Path(adapters_dir).glob("*/adapter.yaml")):
        name = spec_dir.parent.name
        if names and name not in names:
            continue
        try:
            spec = AdapterSpec.from_dir(spec_dir.parent)
            trained = (spec_dir.parent / "adapter_model.safetensors").exists()
            if spec.kind != "base" and not trained:
                failures[name] = f"not trained yet: run `bot train {name}`"
                continue
            tasks[spec.name] = load_task(backbone, spec)
        except BotError as err:
            failures[name] = str(err)
    return tasks, failures


__all__ = ["load_task", "load_all", "discover"]
