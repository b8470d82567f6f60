"""Atomic folder writes (build in a hidden temp folder, then rename) and per-adapter locks."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

from .errors import BusyError

try:
    import fcntl
except ImportError:  # Windows: no flock; training there is unguarded
    fcntl = None

_held: dict[Path, int] = {}  # lock files this process holds -> depth (the lock is re-entrant)
_held_guard = threading.Lock()


def atomic_dir_write(dest: Path, write) -> Path:
    """Call ``write(tmp_dir)`` then swap the finished folder onto ``dest``.

    A crash or Ctrl-C inside ``write`` leaves ``dest`` as it was and removes the temp
    folder. The temp name starts with a dot, so folder scans (``adapters/*/``) skip it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; these folders are meant to be shared
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


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
