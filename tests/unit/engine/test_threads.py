"""bot.engine.threads: a thread that hands work to the engine gives its OpenMP team back."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from bot.engine.threads import _pause_fn, off_engine, release_pool


def _os_threads() -> int:
    """The process's thread count once it has stopped changing (workers of an earlier test's
    finished thread may still be exiting; counting them mid-exit hid a new worker once)."""
    last, same = len(os.listdir("/proc/self/task")), 0
    for _ in range(60):
        time.sleep(0.05)
        now = len(os.listdir("/proc/self/task"))
        same = same + 1 if now == last else 0
        last = now
        if same >= 3:
            break
    return last


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or _pause_fn() is None,
                    reason="needs Linux /proc and an OpenMP runtime next to torch")
def test_release_pool_ends_the_calling_threads_openmp_workers():
    counts = {}

    def work():
        torch.set_num_threads(2)
        before = _os_threads()
        with off_engine():
            x = torch.randn(512, 512)
            for _ in range(3):
                x = torch.tanh(x @ x)  # parallel ops: this thread gets an OpenMP team
            counts["busy"] = _os_threads()
        counts["after"] = _os_threads()
        counts["before"] = before

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert counts["busy"] > counts["before"], counts  # the team's worker was started
    assert counts["after"] < counts["busy"], counts  # ... and ended by off_engine


def test_release_pool_without_a_team_is_harmless():
    assert release_pool() in (True, False)
    assert release_pool() in (True, False)
    assert torch.ones(3).sum().item() == 3.0
