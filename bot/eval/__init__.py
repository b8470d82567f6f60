"""Evaluation: what `bot eval` and `bot bench` measure and how they report it.

* ``evaluate``: per-adapter accuracy against baselines, router quality, latency, learning curves;
* ``metrics``: pure metric functions (classification, router, perplexity) and the TF-IDF baseline;
* ``plots``: the report's PNG figures;
* ``report``: ``eval.json`` + ``eval.md``;
* ``bench``: speed and memory, each figure beside its baseline.

Submodules are imported on use: ``metrics`` needs no torch, ``evaluate`` and ``bench`` do.
"""
