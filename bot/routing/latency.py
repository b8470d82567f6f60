"""Median routing time of short turns, as the machine is and with AVX2 only (issue 11).

Each CPU setting runs in a fresh process (``python -m bot.routing.latency '{json}'``) because
ATen and oneDNN read their ISA limits once, at start-up (the same way ``bot bench --serve``
does). Every turn is routed with an empty embedding cache, so the figure is the cost of
encoding a turn the router has not seen, not of a cache hit.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bot.manifests.spec import discover
from bot.routing.build import build_router
from bot.routing.route_data import router_test_set
from bot.routing.second import attach_if_trained
from bot.serve.load_bench import AVX2_ENV  # one definition of the AVX2-only setting

log = logging.getLogger(__name__)

SHORT_CHARS = 120  # a "short turn": what people type in a chat box


def short_turns(specs, n: int = 200) -> list[str]:
    """``n`` short held-out turns: the hand-written ones first, then the test splits."""
    turns = [t for t, _ in router_test_set(specs) if len(t) <= SHORT_CHARS]
    return list(dict.fromkeys(turns))[:n]


def time_routing(router, turns: list[str]) -> dict:
    """Median and 90th-percentile milliseconds of ``router.route`` over ``turns``, cold cache."""
    router.route("warm up")  # the first call pays one-off allocations
    times = []
    for text in turns:
        router.clear_cache()
        t0 = time.perf_counter()
        router.route(text)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"median_ms": round(statistics.median(times), 2),
            "p90_ms": round(times[int(0.9 * (len(times) - 1))], 2), "n": len(times)}


def measure(adapters_dir, n: int = 200) -> dict:
    """Build (or load the cached) router for ``adapters_dir`` and time ``n`` short turns."""
    specs = discover(adapters_dir)
    router = build_router(specs)
    second = attach_if_trained(router, adapters_dir)  # timed as users get it: with its second stage
    out = time_routing(router, short_turns(specs, n))
    out["second_stage_asked"] = second.asked if second else None
    out["aten_capability"] = torch.backends.cpu.get_cpu_capability()
    out["threads"] = torch.get_num_threads()
    return out


def measure_both_isas(adapters_dir, n: int = 200) -> dict:
    """``{"native": {...}, "avx2": {...}}``: :func:`measure` in one fresh process per setting."""
    results = {}
    for name, env in (("native", {}), ("avx2", AVX2_ENV)):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "latency.json"
            args = json.dumps({"adapters_dir": str(adapters_dir), "n": n, "json": str(out)})
            subprocess.run([sys.executable, "-m", "bot.routing.latency", args],
                           env={**os.environ, **env}, check=True)
            results[name] = {**json.loads(out.read_text()), "env": env}
        log.info("routing, CPU setting %s: median %.1f ms over %d short turns", name,
                 results[name]["median_ms"], results[name]["n"])
    return results


def record_both_isas(latency: dict, adapters_dir) -> None:
    """Measure both CPU settings into a report's ``latency``: ``route_isa``, ``route_ms``, ``route_ms_avx2``."""
    isa = measure_both_isas(adapters_dir)
    latency["route_isa"] = isa
    latency["route_ms"] = isa["native"]["median_ms"]
    latency["route_ms_avx2"] = isa["avx2"]["median_ms"]


def main(argv=None) -> int:
    """Child process entry: ``python -m bot.routing.latency '{"adapters_dir": ..., "json": ...}'``."""
    args = json.loads((argv or sys.argv[1:])[0])
    out = Path(args.pop("json"))
    out.write_text(json.dumps(measure(**args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
