"""Atomic folder writes: build in a hidden temp folder beside the target, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


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
