"""How much a second OpenMP team costs the engine's decode step (see bot/engine/threads.py).

Times a 1-token lean step (w8h kernels, 'chat' adapter, median of 30) in the thread that
loaded the model, in a second thread while the first still holds its OpenMP team, and in a
new thread after the first released it.

    python scripts/thread_pool_check.py
"""

from __future__ import annotations

import statistics
import threading
import time

import torch

from bot import Backbone
from bot.engine import Scheduler
from bot.engine.lean import Segment
from bot.engine.threads import release_pool
from bot.util.assets import default_adapters_dir


def timed(runner, label: str, n: int = 30) -> None:
    with torch.inference_mode():
        runner.step([Segment(0, 0, list(range(100, 140)), "chat")])
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            runner.step([Segment(0, 40 + i, [500], "chat")])
            times.append(time.perf_counter() - t0)
    print(f"{label:48s} median {statistics.median(times) * 1000:6.2f} ms")


def in_thread(runner, label: str) -> None:
    t = threading.Thread(target=timed, args=(runner, label))
    t.start()
    t.join()


def main() -> None:
    bb = Backbone.load()
    bb.load_adapter("chat", default_adapters_dir() / "chat")
    runner = Scheduler(bb, generators=["chat"], precision="w8h").runner
    timed(runner, "loading thread")
    in_thread(runner, "second thread (loading thread holds its team)")
    release_pool()
    in_thread(runner, "second thread (loading thread released its team)")


if __name__ == "__main__":
    main()
