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

from .errors import BusyError

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


def atomic_dir_write(dest: Path, write) -> Path:
    """Call ``write(tmp_dir)`` then swap the finished folder onto ``dest``.

    The temp name starts with a dot, so folder scans (``adapters/*/``) skip it.
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
