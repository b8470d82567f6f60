"""Routing time of short turns with three encoders, interleaved in one process (issue 11).

Usage: flock /work/cpu.lock python scripts/router_latency.py [ADAPTERS_DIR]
       (and again with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 for the AVX2 figure)

Times ``router.route()`` on the 200 short held-out turns that ``bot eval`` times, with the cache
cleared before every call (no cache hits), for: SentenceTransformer.encode (before issue 11's
change), DirectEncoder fp32 (the same vectors) and DirectEncoder int8. The three alternate turn
by turn, so a busy machine slows them alike: read the ratios, not the absolute figures.
"""

import statistics
import sys
import time

import torch

from bot.manifests.spec import discover
from bot.routing.build import build_router
from bot.routing.encoder import load_encoder
from bot.routing.fastenc import DirectEncoder
from bot.routing.latency import short_turns


def main(argv: list[str]) -> None:
    specs = discover(argv[0] if argv else "adapters")
    router = build_router(specs)
    plain = load_encoder(direct=False)
    encoders = {"sentence-transformers encode": plain, "direct fp32": DirectEncoder(plain),
                "direct int8": DirectEncoder(plain, int8=True)}
    turns = short_turns(specs, 200)
    times = {name: [] for name in encoders}
    for encoder in encoders.values():  # warm up each path once
        router.embedder.encoder = encoder
        router.route("warm up")
    for text in turns:
        for name, encoder in encoders.items():
            router.embedder.encoder = encoder
            router.clear_cache()
            t0 = time.perf_counter()
            router.route(text)
            times[name].append((time.perf_counter() - t0) * 1000)
    base = statistics.median(times["sentence-transformers encode"])
    print(f"{len(turns)} short turns, ATen {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, cache cleared before every route()")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<30} median {median:6.2f} ms  ({base / median:.2f}x faster than encode)")


if __name__ == "__main__":
    main(sys.argv[1:])
