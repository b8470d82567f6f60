"""Atomic writes (build beside the target in a hidden temp file or folder, then rename) and
per-adapter locks.

A crash or Ctrl-C leaves the target as it was and removes the temp file or folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

from bot.errors import BusyError

try:
    import fcntl
except ImportError:  # Windows: no flock; training there is unguarded
    fcntl = None

_held: dict[Path, int] = {}  # lock files this process holds -> depth (the lock is re-entrant)
_held_guard = threading.Lock()


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> Path:
    """Write ``text`` (UTF-8) to ``path`` so readers see the old file or the new one, never half.

    Args:
        path: the file to (over)write; its folder is created if needed.
        text: the whole new content.
        mode: permissions of the new file (mkstemp would make it private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_dir_write(dest: Path, write, retire=None) -> Path:
    """Call ``write(tmp_dir)`` then swap the finished folder onto ``dest`` (:func:`swap_in`).

    The temp name starts with a dot, so folder scans (``adapters/*/``) skip it.

    Args:
        retire: called with the previous ``dest`` once the new one is in place (moved aside
            to ``.NAME.old-PID``); None deletes it. bot.manifests.versions passes one that keeps it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; these folders are meant to be shared
        return swap_in(tmp, dest, retire)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once step 1 has renamed it


# The swap in three renames, each of which a kill can interrupt (issue 28):
#   1. SRC -> .NAME.new-PID   the new folder is complete: from here recovery finishes the swap
#   2. NAME -> .NAME.old-PID  (when NAME exists)
#   3. .NAME.new-PID -> NAME
#   4. retire(.NAME.old-PID)  (deleted, or kept as a version by bot.manifests.versions)
# ``recover`` reads what a killed process left and restores the state the names imply.
NEW, OLD = "new", "old"
_swapping: set[Path] = set()  # destinations this process is swapping right now


def _side(dest: Path, what: str, pid: int | None = None) -> Path:
    return dest.with_name(f".{dest.name}.{what}-{os.getpid() if pid is None else pid}")


def swap_in(src: Path, dest: Path, retire=None) -> Path:
    """Make the complete folder ``src`` (on ``dest``'s file system) become ``dest``.

    A kill at any step leaves names :func:`recover` turns back into a whole ``dest``: the
    previous one until the new one is complete and named ``.NAME.new-PID``, the new one after.
    """
    src, dest = Path(src), Path(dest)
    recover(dest, retire)  # a killed earlier swap onto dest is finished first
    new, old = _side(dest, NEW), _side(dest, OLD)
    key = dest.resolve()
    with _held_guard:
        _swapping.add(key)
    try:
        src.rename(new)
        if dest.exists():
            dest.rename(old)
        new.rename(dest)
    except BaseException:  # Ctrl-C or an OS error between renames: repair before leaving
        with _held_guard:
            _swapping.discard(key)
        recover(dest, retire)
        raise
    with _held_guard:
        _swapping.discard(key)
    if old.exists():
        _retire(old, retire)
    return dest


def _retire(old: Path, retire) -> None:
    if retire is None:
        shutil.rmtree(old, ignore_errors=True)
    else:
        retire(old)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (then its leftovers may be a swap in progress)."""
    if pid == os.getpid():
        return False  # ours: this process is not swapping it (checked via _swapping)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return False
    return True


def leftovers(dest: Path) -> dict[str, list[tuple[int, Path]]]:
    """``.NAME.new-PID`` / ``.NAME.old-PID`` beside ``dest`` of processes no longer running."""
    dest = Path(dest)
    found: dict[str, list[tuple[int, Path]]] = {NEW: [], OLD: []}
    if not dest.parent.is_dir():
        return found
    for what in (NEW, OLD):
        for path in dest.parent.glob(f".{glob_escape(dest.name)}.{what}-*"):
            pid = path.name.rsplit("-", 1)[1]
            if pid.isdigit() and path.is_dir() and not _alive(int(pid)):
                found[what].append((int(pid), path))
    return found


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def recover(dest: Path, retire=None) -> list[str]:
    """Finish or undo a folder swap onto ``dest`` that a killed process left half done.

    * ``.NAME.new-PID`` (complete) and no ``NAME``: the swap is finished (new -> NAME);
    * ``.NAME.new-PID`` beside ``NAME``: killed before the old one moved; finished likewise,
      the old ``NAME`` retired;
    * ``.NAME.old-PID`` and no ``NAME`` (nothing newer): the old folder is restored;
    * ``.NAME.old-PID`` beside ``NAME``: killed before the old one was retired; retired now.

    Returns one line per repair, naming the folders, for the caller to show.
    """
    dest = Path(dest)
    with _held_guard:
        if dest.resolve() in _swapping:
            return []
    found = leftovers(dest)
    said = []
    for pid, new in sorted(found[NEW]):
        if dest.exists():
            moved = _side(dest, OLD, pid)
            if moved.exists():  # cannot happen after step 1 of one swap; keep both safe
                continue
            dest.rename(moved)
            found[OLD].append((pid, moved))
        new.rename(dest)
        said.append(f"{dest}: finished an interrupted save (process {pid} was stopped after the "
                    f"new folder was complete; it was {new.name})")
    for pid, old in sorted(found[OLD]):
        if not old.exists():
            continue
        if dest.exists():
            _retire(old, retire)
            said.append(f"{dest}: put away the previous folder {old.name} that an interrupted "
                        f"save (process {pid}) left behind")
        else:
            old.rename(dest)
            said.append(f"{dest}: restored from {old.name}: process {pid} was stopped between "
                        "moving the old folder aside and moving the new one in")
    return said


def recover_all(parent: Path, retire_for=None) -> list[str]:
    """:func:`recover` for every folder under ``parent`` that has swap leftovers.

    Args:
        retire_for: ``retire_for(dest)`` gives the retire callable for ``dest`` (None: delete).
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    names = set()
    for path in parent.glob(".*"):
        stem, dot, rest = path.name[1:].rpartition(".")
        what, _, pid = rest.partition("-")
        if dot and stem and what in (NEW, OLD) and pid.isdigit():
            names.add(stem)
    said = []
    for name in sorted(names):
        dest = parent / name
        said += recover(dest, retire_for(dest) if retire_for else None)
    return said


@contextlib.contextmanager
def adapter_lock(folder: str | Path):
    """Hold ``<parent>/.<name>.lock`` while ``folder`` is trained or re-scored.

    Another process asking for the same lock is refused at once, with the holder's pid.
    The OS drops an flock when its holder exits or crashes, so no stale lock survives.
    Re-entrant within one process (`bot train` locks before loading the backbone, and
    ``train_adapter`` locks again for library callers).
    """
    folder = Path(folder)
    path = (folder.parent / f".{folder.name}.lock").resolve()
    with _held_guard:
        if path in _held:
            _held[path] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield path
        finally:
            with _held_guard:
                _held[path] -= 1
        return
    if fcntl is None:
        yield path
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+", encoding="utf-8")
    except OSError as err:
        raise BusyError(f"cannot create the lock file {path} ({err.strerror}). Fix: make "
                        f"{path.parent} writable") from err
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise BusyError(f"adapter '{folder.name}' is busy: process {holder} is training it (lock "
                        f"{path}). Fix: wait for that run to finish, or stop it; its lock is "
                        "released as soon as it exits") from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        with _held_guard:
            _held[path] = 1
        yield path
    finally:
        with _held_guard:
            _held.pop(path, None)
        fh.close()  # closing releases the flock
