"""Train one adapter from its manifest, evaluate it on held-out data, save atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import shutil
import time
from pathlib import Path

import torch

from bot.errors import AdapterError, DataError, SpecError
from bot.manifests import data as data_mod
from bot.manifests.registry import load_task
from bot.manifests.spec import MANIFEST, AdapterSpec, check_run_values
from bot.manifests.versions import retirer
from bot.model.info import machine
from bot.tasks import task_class
from bot.util.fsutil import adapter_lock, atomic_dir_write, atomic_write_text, recover

log = logging.getLogger(__name__)

METRICS = "metrics.json"
CHECK_N = 100  # the integration test re-measures the first CHECK_N held-out examples
STOP_KEYS = ("stop_reason", "epochs_run", "budget_minutes", "patience", "check_every_steps",
             "planned_steps", "best_step", "best_val_accuracy", "validation", "val_rows", "train_items")
PATH_KEYS = ("path", "path_reason", "epoch_seconds", "cache_seconds", "cache_mb", "cache_where")


def training_rows(spec: AdapterSpec, max_examples: int | None = None):
    """(spec with labels filled in, Splits) for a manifest; checks user data first."""
    rows = data_mod.load_source(spec.data, spec.kind, spec.folder)
    where = spec.data.get("path") or spec.data.get("bundled")
    if spec.kind == "classify":
        found = data_mod.check_classify_rows(rows, where, spec.data.get("min_per_label", 5))
        if not spec.labels:
            spec = spec.replace(labels=found)
        unknown = sorted(set(found) - set(spec.labels))
        if unknown:
            raise DataError(f"{where}: label(s) {unknown} are not in the manifest's labels "
                            f"{spec.labels}. Fix: add them under 'labels:' in adapter.yaml")
    splits = data_mod.split(rows, seed=spec.train.seed)
    cap = max_examples or spec.train.max_examples
    if cap and len(splits.train) > cap:
        rng = random.Random(spec.train.seed)
        log.warning("%s: training on %d of the %d training examples (capped by %s)", where, cap,
                    len(splits.train), "--max-examples" if max_examples else "train.max_examples")
        splits.train = rng.sample(splits.train, cap)
    splits.train = splits.train + extra_training_rows(spec)
    return spec, splits


def extra_training_rows(spec: AdapterSpec) -> list[dict]:
    """Rows of the files under ``data.train_extra``: added to training only, never held out.

    The held-out split stays the data set's own, so its scores keep measuring that data
    (the chat adapter's self-distilled replies, issue 11, must not inflate its dialogue score).
    """
    rows = []
    for path in spec.data.get("train_extra") or []:
        rows += data_mod.load_source({"path": path}, spec.kind, spec.folder)
    return rows


def train_adapter(spec: AdapterSpec, backbone, out_dir: str | Path, *, epochs: float | None = None,
                  max_examples: int | None = None, eval_examples: int | None = 1000,
                  command: str = "", parallel=None, budget_minutes: float | None = None,
                  val_rows: list[dict] | None = None) -> dict:
    """Train ``spec`` on ``backbone`` and write the adapter folder ``out_dir`` atomically.

    Nothing is written to ``out_dir`` until training and evaluation have finished, so a
    crash or Ctrl-C leaves the previous adapter intact.

    Args:
        parallel: a bot.training.parallel.Parallel: data-parallel processes and gradient
            accumulation (None = this process alone). Only the main process evaluates
            and saves; the others return their training figures.
        budget_minutes: classify training's time budget (default ``train.budget_minutes``).
        val_rows: what classify training validates on to stop (default: the validation split).

    Returns:
        the metrics dict also written to ``metrics.json``.
    """
    check_run_values(epochs=epochs, max_examples=max_examples, eval_examples=eval_examples,
                     budget=budget_minutes)
    if budget_minutes is not None:
        spec = spec.replace(train=dataclasses.replace(spec.train, budget_minutes=budget_minutes))
    check_context(spec, backbone)
    # with several processes only the main one locks: it alone evaluates and saves
    main_process = parallel is None or parallel.is_main
    with adapter_lock(out_dir) if main_process else contextlib.nullcontext():
        if main_process:  # a save a kill interrupted is finished or undone first, and said so
            for line in recover(Path(out_dir), retirer(Path(out_dir), "interrupted save")):
                log.warning("%s", line)
        return _train(spec, backbone, out_dir, epochs, max_examples, eval_examples, command,
                      parallel, val_rows)


def check_context(spec: AdapterSpec, backbone) -> None:
    """``train.max_length`` must fit the backbone's context window."""
    context = getattr(backbone.base.config, "max_position_embeddings", None)
    if context and spec.train.max_length > context:
        raise SpecError(f"{_manifest(spec)}: key 'train.max_length' must be <= {context}, the context of "
                        f"backbone {backbone.info.name}, got {spec.train.max_length}. Fix: set "
                        f"train.max_length to {min(context, 512)} or less")


def _manifest(spec: AdapterSpec) -> str:
    return str(spec.folder / MANIFEST) if spec.folder else f"adapter '{spec.name}'"


def _train(spec, backbone, out_dir, epochs, max_examples, eval_examples, command, parallel,
           val_rows=None) -> dict:
    spec, splits = training_rows(spec, max_examples)
    epochs = epochs if epochs is not None else spec.train.epochs
    torch.manual_seed(spec.train.seed)
    backbone.drop_adapter(spec.name)
    try:
        backbone.add_adapter(spec.name, spec.lora.to_peft(model=backbone.base))
    except AdapterError as err:
        raise SpecError(f"{_manifest(spec)}: key 'lora.target_modules': {err}") from err
    task = task_class(spec.kind)(spec, backbone)
    t0 = time.perf_counter()
    if spec.kind == "classify":  # stops when the validation score stops improving
        stats = task.fit(splits.train, epochs, spec.train.seed, parallel=parallel,
                         val_rows=splits.val if val_rows is None else val_rows)
    else:  # generation: the planned epochs (automatic = one pass)
        stats = task.fit(splits.train, 1.0 if epochs is None else epochs, spec.train.seed,
                         parallel=parallel)
    epochs = stats.get("epochs_planned", epochs)
    train_seconds = time.perf_counter() - t0
    if parallel is not None and not parallel.is_main:
        return {"adapter": spec.name, "steps": stats["steps"], "process": parallel.rank}

    test = splits.test[:eval_examples] if eval_examples else splits.test
    t1 = time.perf_counter()
    heldout = task.evaluate(test)
    check = task.evaluate(splits.test[:CHECK_N])
    spec = spec.replace(backbone={"name": backbone.info.name, "fingerprint": backbone.fingerprint})
    metrics = {
        "adapter": spec.name, "kind": spec.kind,
        "heldout": heldout, f"heldout_first_{CHECK_N}": _headline(check),
        "split_sizes": splits.sizes(), "eval_examples": len(test),
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(time.perf_counter() - t1, 1),
        "examples_seen": stats["examples_seen"], "steps": stats["steps"], "epochs": epochs,
        "final_loss": stats["final_loss"], "loss_curve": stats["losses"],
        "train_path": {k: stats[k] for k in PATH_KEYS if k in stats},
        **{k: stats[k] for k in STOP_KEYS if k in stats},
        "seed": spec.train.seed, "command": command, "backbone": spec.backbone,
        "machine": machine(), "device": str(backbone.device), "weights": backbone.load_in,
        "processes": parallel.world if parallel else 1,
        "grad_accum": parallel.grad_accum if parallel else 1,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        **_kept_timing(spec, out_dir),
    }
    save_adapter_folder(spec, backbone, task, metrics, out_dir)
    return metrics


def _headline(evaluation: dict) -> dict:
    """Only the numbers the integration test compares (accuracy per view, or perplexity)."""
    if "ppl_adapter" in evaluation:
        return {"ppl_adapter": evaluation["ppl_adapter"], "ppl_base": evaluation["ppl_base"]}
    return {view: {"accuracy": m["accuracy"], "n": m["n"]} for view, m in evaluation.items()}


def save_adapter_folder(spec, backbone, task, metrics: dict, out_dir: str | Path,
                        keep_previous: bool = True) -> Path:
    """Write manifest + LoRA + task extras + metrics into a temp folder, then swap it in.

    Args:
        keep_previous: the folder it replaces is kept as a version (bot.manifests.versions; ``bot
            rollback NAME`` restores it) rather than deleted.
    """

    def write(tmp: Path) -> None:
        spec.save(tmp)
        backbone.save_adapter(spec.name, tmp)
        task.save_extra(tmp)
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "README.md").unlink(missing_ok=True)  # peft writes a model card we do not want
        # from where the manifest reads them (its own folder), which may differ from out_dir
        for f in data_files(spec, Path(spec.folder or out_dir)):
            shutil.copy2(f, tmp / f.name)
        for f in tmp.iterdir():
            f.chmod(0o644)

    out_dir = Path(out_dir)
    return atomic_dir_write(out_dir, write, retirer(out_dir, "retrained") if keep_previous else None)


def data_files(spec, folder: Path) -> list[Path]:
    """Data files the manifest names inside its own folder (and their ``.meta.json`` notes).

    The folder is swapped whole on save, so these are carried over into the new one.
    """
    sources = [spec.data, spec.route_data]
    names = [s.get("path") for s in sources] + list(spec.data.get("train_extra") or [])
    files = []
    for name in filter(None, names):
        path = folder / name
        if not Path(name).is_absolute() and path.parent == folder and path.is_file():
            files += [path] + [m for m in [path.with_suffix(".meta.json")] if m.is_file()]
    return files


def reevaluate_adapter(folder: str | Path, backbone, eval_examples: int | None = 1000,
                       command: str = "") -> dict:
    """Re-score a trained adapter on its held-out split and update metrics.json in place.

    The training figures (time, examples, command) are kept; the held-out ones are replaced.
    """
    check_run_values(eval_examples=eval_examples)
    folder = Path(folder)
    with adapter_lock(folder):
        return _reevaluate(folder, backbone, eval_examples, command)


def _reevaluate(folder: Path, backbone, eval_examples, command) -> dict:
    spec = AdapterSpec.from_dir(folder)
    task = load_task(backbone, spec)
    _, splits = training_rows(spec)
    test = splits.test[:eval_examples] if eval_examples else splits.test
    t0 = time.perf_counter()
    metrics = json.loads((folder / METRICS).read_text())
    metrics.update({
        "heldout": task.evaluate(test), f"heldout_first_{CHECK_N}": _headline(task.evaluate(splits.test[:CHECK_N])),
        "eval_examples": len(test), "eval_seconds": round(time.perf_counter() - t0, 1),
        "eval_command": command, "eval_date": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    atomic_write_text(folder / METRICS, json.dumps(metrics, indent=2) + "\n")
    return metrics


def time_cache(spec: AdapterSpec, backbone, steps: int = 8) -> dict:
    """Seconds per epoch with and without cached frozen layers, timed side by side.

    Trains a throwaway copy of the adapter for ``steps`` step pairs (see
    ``ClassifyTask.time_paths``), then records the figures as ``cache_speedup`` in the
    adapter's metrics.json (if it exists).
    """
    if spec.kind != "classify":
        raise SpecError(f"--time-cache times classify training; adapter '{spec.name}' is {spec.kind}")
    spec, splits = training_rows(spec)
    name = f"{spec.name}-timing"
    backbone.drop_adapter(name)
    torch.manual_seed(spec.train.seed)
    backbone.add_adapter(name, spec.lora.to_peft(model=backbone.base))
    try:
        result = task_class(spec.kind)(spec.replace(name=name), backbone).time_paths(
            splits.train, steps, spec.train.seed)
    finally:
        backbone.drop_adapter(name)
    result.update(date=time.strftime("%Y-%m-%d %H:%M:%S"), settings=_timing_settings(spec))
    path = Path(spec.folder) / METRICS if spec.folder else None
    if path and path.exists() and "cache_speedup" in result:
        with adapter_lock(spec.folder):  # re-entrant: `bot train --time-cache` already holds it
            metrics = json.loads(path.read_text())
            metrics["cache_speedup"] = result["cache_speedup"]
            metrics["cache_timing"] = result
            atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
    return result


def _timing_settings(spec: AdapterSpec) -> dict:
    """What the per-epoch timing depends on; a retrain with the same settings keeps the figure."""
    settings = {"lora": dataclasses.asdict(spec.lora), "max_length": spec.train.max_length,
                "batch_size": spec.train.batch_size, "data": spec.data}
    if spec.train.view_repeats != 1:  # more items per epoch (absent = 1, as recorded before it existed)
        settings["view_repeats"] = spec.train.view_repeats
    return settings


def _kept_timing(spec: AdapterSpec, out_dir: Path) -> dict:
    """``cache_speedup`` from the previous metrics.json, if measured with the same settings."""
    try:
        old = json.loads((Path(out_dir) / METRICS).read_text())
    except (OSError, ValueError):
        return {}
    timing = old.get("cache_timing") if isinstance(old, dict) else None
    if not isinstance(timing, dict) or "cache_speedup" not in old \
            or timing.get("settings") != json.loads(json.dumps(_timing_settings(spec))):
        return {}
    return {"cache_speedup": old["cache_speedup"], "cache_timing": timing}

