"""Adapter versions: training again keeps the previous folder, ``bot rollback`` restores it.

Each adapter ``ADAPTERS_DIR/NAME`` has a small history beside it, hidden from folder scans::

    ADAPTERS_DIR/.versions/NAME/<stamp>/files/         the whole previous folder, as it was
    ADAPTERS_DIR/.versions/NAME/<stamp>/version.json   when and why it was put away (optional)

A ``version.json`` with ``"absent": true`` and no ``files/`` records that NAME did not exist
before (``bot add --train`` writes one), so rolling back a new adapter removes it again; one
with ``"trash"`` points at the folder ``bot rm`` moved to ``ADAPTERS_DIR/.trash/``. Every move is
a rename (bot.util.fsutil.swap_in), so a kill at any point leaves a state ``recover_adapters``
repairs. Nothing is deleted: versions beyond ``KEEP`` and folders replaced by a rollback go to
``ADAPTERS_DIR/.trash/``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from bot.errors import DataError
from bot.manifests import router_folder
from bot.manifests.spec import discover
from bot.util.fsutil import adapter_lock, atomic_write_text, recover, recover_all, swap_in

log = logging.getLogger(__name__)

VERSIONS = ".versions"
TRASH = ".trash"
FILES = "files"
META = "version.json"
KEEP = 5  # previous versions kept per adapter; older ones move to the trash
HISTORY_NOTE = ("`bot list` shows {name}'s versions; `bot rollback {name}` restores the previous one "
                "(the router follows the manifests it restores)")


def history_dir(folder: Path) -> Path:
    """Where the previous versions of the adapter folder ``folder`` live."""
    folder = Path(folder)
    return folder.parent / VERSIONS / folder.name


def _stamp(history: Path) -> Path:
    """A new, sortable entry folder name under ``history`` (local time, microseconds)."""
    t = time.time()
    base = time.strftime("%Y%m%d-%H%M%S", time.localtime(t)) + f".{int(t % 1 * 1e6):06d}"
    entry, n = history / base, 1
    while entry.exists():
        n += 1
        entry = history / f"{base}-{n}"
    return entry


def _write_meta(entry: Path, meta: dict) -> None:
    atomic_write_text(entry / META, json.dumps(meta, indent=1) + "\n")


def keep_previous(old: Path, dest: Path, reason: str = "replaced", extra: dict | None = None) -> Path:
    """Move ``old`` (the folder that was ``dest``) into ``dest``'s history; return the entry.

    The rename is the last step: a kill before it leaves ``old`` where bot.util.fsutil.recover
    finds it and calls this again.
    """
    entry = _stamp(history_dir(dest))
    entry.mkdir(parents=True)
    _write_meta(entry, {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "reason": reason, **(extra or {})})
    Path(old).rename(entry / FILES)
    log.info("kept the previous %s as a version (%s); bot rollback %s restores it",
             dest.name, entry, dest.name)
    _prune(history_dir(dest))
    return entry


def retirer(dest: Path, reason: str = "replaced", extra: dict | None = None):
    """A ``retire`` callable for bot.util.fsutil that keeps the previous ``dest`` as a version.

    A folder that holds no trained weights (a manifest ``bot add`` wrote, not trained yet)
    has nothing to roll back to and is deleted as before: the new folder carries its
    manifest and data files (bot.training.train.save_adapter_folder)."""

    def retire(old: Path) -> None:
        if (Path(old) / "adapter_model.safetensors").is_file():
            keep_previous(old, Path(dest), reason, extra)
        else:
            shutil.rmtree(old, ignore_errors=True)

    return retire


def record_absent(dest: Path, reason: str, extra: dict | None = None) -> Path:
    """Record that ``dest`` did not exist before a change (rolling back removes it again)."""
    entry = _stamp(history_dir(dest))
    entry.mkdir(parents=True)
    _write_meta(entry, {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "reason": reason,
                        "absent": True, **(extra or {})})
    return entry


def to_trash(folder: Path, root: Path | None = None, name: str | None = None) -> Path:
    """Move ``folder`` to ``ROOT/.trash/<name>-<time>/`` (never deleted).

    Args:
        root: the adapters folder (None: ``folder``'s parent).
        name: the adapter's name (None: read from a ``.NAME.old-PID`` folder name).
    """
    folder = Path(folder)
    trash = Path(root or folder.parent) / TRASH
    trash.mkdir(exist_ok=True)
    name = name or folder.name.lstrip(".").split(".old-")[0].split(".new-")[0]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = trash / f"{name}-{stamp}", 1
    while dest.exists():
        n += 1
        dest = trash / f"{name}-{stamp}-{n}"
    folder.rename(dest)
    log.info("moved %s to %s", folder.name, dest)
    return dest


def _prune(history: Path) -> None:
    entries = sorted(p for p in history.iterdir() if p.is_dir())
    for entry in entries[:-KEEP] if len(entries) > KEEP else []:
        trash = history.parent.parent / TRASH / "versions" / history.name
        trash.mkdir(parents=True, exist_ok=True)
        entry.rename(trash / entry.name)
        log.info("version %s of %s moved to %s (more than %d kept)", entry.name, history.name,
                 trash, KEEP)


def _meta(entry: Path) -> dict:
    try:
        meta = json.loads((entry / META).read_text(encoding="utf-8"))
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def _metrics(folder: Path) -> dict:
    try:
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        return metrics if isinstance(metrics, dict) else {}
    except (OSError, ValueError):
        return {}


def list_versions(folder: Path) -> list[dict]:
    """The usable previous versions of ``folder``, newest first.

    Each: ``id`` (the entry name), ``entry`` (its folder), ``source`` (the folder to restore,
    or None when the adapter was absent), ``absent``, ``date``, ``reason`` and ``metrics``
    (the version's metrics.json, {} without one).
    """
    history = history_dir(folder)
    if not history.is_dir():
        return []
    out = []
    for entry in sorted((p for p in history.iterdir() if p.is_dir()), reverse=True):
        meta = _meta(entry)
        if meta.get("absent"):
            source = None
        elif (entry / FILES).is_dir():
            source = entry / FILES
        elif meta.get("trash") and Path(meta["trash"]).is_dir():
            source = Path(meta["trash"])
        else:
            continue  # what a restore or an interrupted move left: nothing to restore
        metrics = _metrics(source) if source else {}
        out.append({"id": entry.name, "entry": entry, "source": source, "absent": source is None,
                    "date": meta.get("date") or metrics.get("date") or entry.name,
                    "reason": meta.get("reason", ""), "metrics": metrics,
                    "router_key": meta.get("router_key")})
    return out


def score_line(metrics: dict) -> str:
    """The held-out figures of a metrics.json, short: ``text 98.8 %`` or ``ppl 33.20``."""
    heldout = metrics.get("heldout") if isinstance(metrics, dict) else None
    if not isinstance(heldout, dict):
        return "no held-out scores"
    if "ppl_adapter" in heldout:
        return f"held-out ppl {heldout['ppl_adapter']:.2f}"
    parts = [f"{view} {100 * m['accuracy']:.1f} %" for view, m in heldout.items()
             if isinstance(m, dict) and isinstance(m.get("accuracy"), (int, float))]
    return ", ".join(parts) or "no held-out scores"


def rollback(adapters_dir, name: str) -> dict:
    """Put the newest previous version of ``name`` back in place (``bot rollback NAME``).

    The folder now in place goes to the trash; the restored version leaves the history, so
    rolling back again goes one version further back. A version recorded as absent (the
    adapter was new) removes the adapter again. When the router's second stage was retrained
    for another route set since, its version fitted for the restored route set comes back too.

    Returns:
        {"name", "restored": version id, "absent": bool, "replaced": trash path or None,
         "date", "metrics", "router": one line on the router, "router_key"}.
    """
    folder = Path(adapters_dir) / name
    with adapter_lock(folder):
        recover(folder, retirer(folder))
        versions = list_versions(folder)
        if not versions:
            raise DataError(f"{history_dir(folder)}: no earlier version of '{name}' to restore. "
                            f"Fix: nothing to roll back; `bot list` shows the versions kept")
        version = versions[0]
        replaced = None
        if version["absent"]:
            if folder.exists():
                replaced = to_trash(folder)
        else:
            trashed: list[Path] = []
            swap_in(version["source"], folder, lambda old: trashed.append(to_trash(old)))
            replaced = trashed[0] if trashed else None
        shutil.rmtree(version["entry"], ignore_errors=True)  # only its version.json is left
    router = restore_second_stage(adapters_dir)
    return {"name": name, "restored": version["id"], "absent": version["absent"],
            "replaced": replaced, "date": version["date"], "metrics": version["metrics"],
            "router": router, "router_key": version.get("router_key")}


def restore_second_stage(adapters_dir) -> str:
    """When the second stage fits other routes than the adapters now give, put back its newest
    version fitted for these routes (``bot train-router`` keeps the previous ones); say what."""
    routes = sorted(s.name for s in discover(adapters_dir))
    folder = router_folder.folder_of(adapters_dir)
    fitted = router_folder.fitted_routes(folder)
    if fitted is None or sorted(fitted) == routes:
        return "router second stage: " + ("none" if fitted is None else "unchanged, fitted for these routes")
    for version in list_versions(folder):
        if version["source"] and sorted(router_folder.fitted_routes(version["source"]) or []) == routes:
            with adapter_lock(folder):
                swap_in(version["source"], folder, retirer(folder, "rollback"))
                shutil.rmtree(version["entry"], ignore_errors=True)
            return f"router second stage: its version fitted for {routes} restored ({version['id']})"
    return (f"router second stage: fitted for {sorted(fitted)}, no kept version fits {routes}; "
            "the router asks it only about the routes it knows (bot train-router refits it)")


def remove(adapters_dir, name: str, extra: dict | None = None) -> Path:
    """``bot rm NAME``: move the adapter folder to the trash and remember where, so
    ``bot rollback NAME`` can bring it back. Returns the trash folder."""
    folder = Path(adapters_dir) / name
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist. Fix: `bot list` shows the adapters")
    with adapter_lock(folder):
        recover(folder, retirer(folder))
        entry = _stamp(history_dir(folder))
        moved = to_trash(folder)
        entry.mkdir(parents=True)
        _write_meta(entry, {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "reason": "bot rm",
                            "trash": str(moved.resolve()), **(extra or {})})
    return moved


def recover_adapters(adapters_dir) -> list[str]:
    """Repair every folder swap a killed process left half done under ``adapters_dir`` (and
    its ``.router``), keeping replaced folders as versions; each repair is logged."""
    root = Path(adapters_dir)
    said = recover_all(root, retire_for=lambda dest: retirer(dest, "interrupted save"))
    said += recover_all(root / ".router", retire_for=lambda dest: retirer(dest, "interrupted save"))
    for line in said:
        log.warning("%s", line)
    return said
