"""Keep the engine thread the only holder of an OpenMP thread team.

PyTorch's CPU build parallelises each op with OpenMP (GNU libgomp). Every thread that
runs a parallel op gets its own team of worker threads, kept for the thread's lifetime.
Between two parallel regions the workers of a team spin for a while before sleeping,
which makes a decode step (about a thousand small ops) cheap to wake; but libgomp spins
only about 100 times, that is hardly at all, once the process holds more OpenMP threads
than it has CPUs (``gomp_throttled_spin_count_var`` in libgomp's ``env.c``). A process
that loaded the model in its main thread (one team) and decodes in the engine thread (a
second team) is over that line on a 2-core machine, and every op of the step then pays a
futex wake-up of its worker.

Measured on a 2-core AVX512-BF16 EPYC, one 1-token lean step (w8h kernels, 'chat'
adapter), median of 30: 17.5-19.5 ms in the thread that loaded the model, 26-39 ms in a
second thread, 17.5-19 ms in that second thread once the first released its team with
:func:`release_pool` (reproduce: ``python scripts/thread_pool_check.py``).

So the engine calls :func:`release_pool` in the thread that starts it, and callers that
run torch work off the engine thread (the router's encoder in a request handler) wrap it
in :func:`off_engine`, which releases that thread's team afterwards. Releasing costs a
thread join; the next parallel op of that thread builds a new team.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import os
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)
_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t's omp_pause_soft (OpenMP 5.0)
_pause = None
_looked = False


def _pause_fn():
    """``omp_pause_resource_all`` of the OpenMP runtime torch uses, or None where there is none."""
    global _pause, _looked
    if _looked:
        return _pause
    _looked = True
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    candidates = sorted(glob.glob(os.path.join(lib_dir, "libgomp*.so*"))
                        + glob.glob(os.path.join(lib_dir, "libomp*.so*"))
                        + glob.glob(os.path.join(lib_dir, "libiomp*.so*")))
    for path in candidates:
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        _pause = fn
        break
    if _pause is None:
        log.debug("no OpenMP runtime with omp_pause_resource_all next to torch (%s)", lib_dir)
    return _pause


def release_pool() -> bool:
    """Free the calling thread's OpenMP team (no-op without an OpenMP runtime); True if freed."""
    fn = _pause_fn()
    if fn is None:
        return False
    return fn(_OMP_PAUSE_SOFT) == 0


@contextlib.contextmanager
def off_engine() -> Iterator[None]:
    """Run torch work in a thread other than the engine's, then release that thread's team."""
    try:
        yield
    finally:
        release_pool()
