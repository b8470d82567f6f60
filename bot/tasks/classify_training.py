"""Training a ``classify`` adapter: batches, the frozen-layer cache, validation, stopping.

``ClassifyTraining`` is the training half of ``bot.tasks.classify.ClassifyTask`` (it uses
the task's ``spec``, ``backbone``, ``head``, ``labels`` and ``_items``).
"""

from __future__ import annotations

import logging
import math
import random
import time

import torch
from tqdm.auto import tqdm

from bot.engine.pooling import pool_windows
from bot.model.backbone import last_token_states
from bot.tasks import frozen, stopping
from bot.tasks.base import length_bucketed_batches, lora_parameters, optimise

log = logging.getLogger(__name__)


class ClassifyTraining:
    """Training methods of a classify task (mixed into ``ClassifyTask``)."""

    def _batches(self, items, seed: int) -> tuple[list[list[int]], list[int]]:
        """Length-bucketed batches of item indices, and each item's token count."""
        cfg = self.spec.train
        tok = self.backbone.tokenizer
        lengths = [len(ids) for ids in tok([t for t, _ in items], truncation=True,
                                            max_length=cfg.max_length)["input_ids"]]
        batches = length_bucketed_batches(range(len(items)), lengths.__getitem__, cfg.batch_size,
                                          random.Random(seed))
        return batches, lengths

    def _loss_uncached(self, items, batch: list[int]) -> torch.Tensor:
        enc = self.backbone.encode([items[i][0] for i in batch], self.spec.train.max_length)
        out = self.backbone.forward(enc, self.name, output_hidden_states=True, logits_to_keep=1)
        pooled = last_token_states(out.hidden_states[-1], enc["attention_mask"])
        return self._loss(pooled, items, batch)

    def _loss_cached(self, items, batch: list[int], cache: frozen.StateCache, k: int) -> torch.Tensor:
        hidden, mask = (t.to(self.backbone.device) for t in cache.batch(cache.rows(batch)))
        states = frozen.upper_states(self.backbone, hidden, mask, k)
        return self._loss(last_token_states(states, mask), items, batch)

    def _loss(self, pooled, items, batch) -> torch.Tensor:
        target = torch.tensor([items[i][1] for i in batch], device=pooled.device)
        return torch.nn.functional.cross_entropy(self.head(pooled.float()), target)

    def build_cache(self, items, lengths, k: int, among=None, desc: str = "") -> frozen.StateCache:
        """Hidden states entering layer ``k`` for every distinct prompt among ``items``
        (or the item ids ``among``); see ``frozen.build_cache``."""
        cfg = self.spec.train
        return frozen.build_cache(self.backbone, self.name, [t for t, _ in items], lengths, k,
                                  cfg.batch_size * cfg.max_length, cfg.max_length, among=among,
                                  desc=desc or f"cache {self.name} layers 0-{k - 1}")

    def fit(self, rows: list[dict], epochs: float | None, seed: int, cache: bool | None = None,
            parallel=None, val_rows: list[dict] | None = None, budget_s: float | None = None) -> dict:
        """Train LoRA + head on rows ``{"text", "label", ["views"]}``.

        Each row's extra views (e.g. a headline) are added as training examples too.

        Args:
            epochs: the most passes (None = ``stopping.auto_epochs``).
            cache: None = cache the frozen layers when ``frozen.plan`` allows it;
                False = always run the whole model (the reference path).
            parallel: a bot.training.parallel.Parallel (processes, gradient accumulation); None = alone.
            val_rows: validation rows; with them, training stops when the validation score
                stops improving (``train.patience``) and keeps the best checkpoint.
            budget_s: wall-clock seconds for the whole run (default ``train.budget_minutes``).
        Returns:
            optimise()'s stats plus ``path`` (cached/uncached), ``path_reason`` and, when
            cached, ``cache_seconds``, ``cache_mb`` and ``cache_where``; with a stopping
            rule, why training stopped (``stopping.Stopper.summary``).
        """
        started = time.perf_counter()
        cfg = self.spec.train
        items, _ = self._items(rows)
        batches, lengths = self._batches(items, seed)
        if epochs is None:
            epochs = stopping.auto_epochs(len(items), len(self.labels))
            log.info("train %s: up to %g epochs (automatic: %d items, %d labels)", self.name, epochs,
                     len(items), len(self.labels))
        alone = parallel is None or parallel.world == 1
        if val_rows and not alone:
            log.warning("train %s: early stopping is off with several processes; the planned "
                        "epochs run", self.name)
        val = self._val_set(val_rows, seed) if val_rows and alone else None
        k, reason = frozen.plan(self.backbone, self.name) if cache is not False else (None, "caching was turned off")
        log.info("train %s: %s path (%s)", self.name, "cached" if k else "uncached", reason)
        extra = {"path": "cached" if k else "uncached", "path_reason": reason}
        states = None
        if k:
            t0 = time.perf_counter()
            states = self.build_cache(items, lengths, k)
            extra.update(cache_seconds=round(time.perf_counter() - t0, 1),
                         cache_mb=round(states.nbytes / 2**20, 1), cache_where=states.where)
            log.info("train %s: cached %.0f MB in %s (%.0f s)", self.name, extra["cache_mb"],
                     states.where, extra["cache_seconds"])
            if val is not None:
                val["cache"] = self.build_cache(val["items"], val["lengths"], k,
                                                desc=f"cache {self.name} validation")
        # seeded after the cache pass, so both paths start from the same random state
        torch.manual_seed(seed)
        torch.nn.init.normal_(self.head.weight, std=0.02)
        if self.head.bias is not None:
            torch.nn.init.zeros_(self.head.bias)

        def loss_fn(batch):
            if states is not None:
                return self._loss_cached(items, batch, states, k)
            return self._loss_uncached(items, batch)

        groups = [{"params": lora_parameters(self.backbone, self.name), "lr": cfg.learning_rate},
                  {"params": list(self.head.parameters()), "lr": cfg.head_lr}]
        stopper = None
        if alone:
            total = max(1, math.ceil(len(batches) * epochs))
            stopper = stopping.Stopper(
                validate=(lambda: self._validate(val, k)) if val is not None else None,
                params=[p for g in groups for p in g["params"]],
                budget_s=budget_s or cfg.budget_minutes * 60, patience=cfg.patience,
                every=stopping.check_every(len(batches), total), started=started)
        try:
            stats = optimise(self.backbone, self.name, groups, batches, loss_fn, epochs,
                             desc=f"train {self.name} ({extra['path']})", modules=[self.head],
                             parallel=parallel, stopper=stopper)
        finally:
            for cached in (states, val and val.get("cache")):
                if cached is not None:
                    cached.close()
        done = stats["steps"] / len(batches)  # epochs actually run
        stats["examples_seen"] = sum(len(batches[i % len(batches)]) for i in range(stats["steps"]))
        stats["epochs_planned"], stats["epochs_run"] = epochs, round(done, 3)
        stats["epoch_seconds"] = round(stats["seconds"] / max(done, 1e-9), 1)
        stats["train_items"] = len(items)
        if val is not None:
            stats["val_rows"] = val["rows"]
        return {**stats, **extra}

    def _val_set(self, rows: list[dict], seed: int) -> dict:
        """Validation items (texts windowed, each view once), at most ``VAL_MAX_ROWS`` rows."""
        if len(rows) > stopping.VAL_MAX_ROWS:
            rows = random.Random(seed).sample(rows, stopping.VAL_MAX_ROWS)
        items, groups = self._items(rows, repeat=False)
        lengths = [len(ids) for ids in self.backbone.tokenizer(
            [t for t, _ in items], truncation=True, max_length=self.spec.train.max_length)["input_ids"]]
        order = sorted(range(len(items)), key=lengths.__getitem__)
        size = self.spec.train.batch_size * 2
        return {"items": items, "groups": groups, "lengths": lengths, "rows": len(rows),
                "batches": [order[i:i + size] for i in range(0, len(order), size)], "cache": None}

    @torch.no_grad()
    def _validate(self, val: dict, k: int | None) -> tuple[float, float]:
        """(accuracy, mean negative log-likelihood) on the validation set, windows pooled."""
        items, cache = val["items"], val["cache"]
        logits = [None] * len(items)
        for batch in val["batches"]:
            if cache is not None:
                hidden, mask = (t.to(self.backbone.device) for t in cache.batch(cache.rows(batch)))
                pooled = last_token_states(frozen.upper_states(self.backbone, hidden, mask, k), mask)
            else:
                enc = self.backbone.encode([items[i][0] for i in batch], self.spec.train.max_length)
                with self.backbone.autocast():
                    out = self.backbone.forward(enc, self.name, output_hidden_states=True, logits_to_keep=1)
                pooled = last_token_states(out.hidden_states[-1], enc["attention_mask"])
            for i, row in zip(batch, self.head(pooled.float()).cpu()):
                logits[i] = row
        log_probs = pool_windows(torch.stack(logits).log_softmax(-1), val["groups"])
        first = {}
        for i, g in enumerate(val["groups"]):
            first.setdefault(g, i)
        target = torch.tensor([items[first[g]][1] for g in range(len(log_probs))])
        accuracy = float((log_probs.argmax(-1) == target).float().mean())
        return accuracy, float(torch.nn.functional.nll_loss(log_probs, target))

    def time_paths(self, rows: list[dict], steps: int, seed: int = 0) -> dict:
        """Seconds per training epoch, uncached vs cached, timed side by side.

        Runs ``steps`` optimiser steps of each path, alternating (uncached, cached) on
        the same batches, so a busy machine slows both alike; wall-clock and process CPU
        seconds are both kept. The one-off cache pass is timed separately. Call on a
        fresh, throwaway adapter: it trains it.
        """
        items, _ = self._items(rows)
        batches, lengths = self._batches(items, seed)
        k, reason = frozen.plan(self.backbone, self.name)
        if not k:
            return {"path": "uncached", "path_reason": reason}
        chosen = batches[:steps]
        t0 = time.perf_counter()
        cache = self.build_cache(items, lengths, k, among=sorted({i for b in chosen for i in b}),
                                 desc="cache (timing)")
        per_batch = (time.perf_counter() - t0) / len(chosen)
        params = lora_parameters(self.backbone, self.name) + list(self.head.parameters())
        opt = torch.optim.AdamW(params, lr=self.spec.train.learning_rate)
        seconds = {"uncached": 0.0, "cached": 0.0}
        cpu = {"uncached": 0.0, "cached": 0.0}  # process CPU time: less swayed by other jobs
        self.backbone.peft.train()
        try:
            with self.backbone.lock:
                self.backbone.peft.set_adapter(self.name)
                for batch in tqdm(chosen, desc="time uncached vs cached", unit="step pair"):
                    for path in ("uncached", "cached"):
                        t, c = time.perf_counter(), time.process_time()
                        loss = (self._loss_cached(items, batch, cache, k) if path == "cached"
                                else self._loss_uncached(items, batch))
                        loss.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        seconds[path] += time.perf_counter() - t
                        cpu[path] += time.process_time() - c
        finally:
            self.backbone.peft.eval()
            cache.close()
        scale = len(batches) / len(chosen)  # seconds per epoch
        out = {f"{p}_epoch_seconds": round(s * scale, 3) for p, s in seconds.items()}
        out.update({f"{p}_epoch_cpu_seconds": round(s * scale, 3) for p, s in cpu.items()})
        return {**out, "cache_speedup": round(seconds["uncached"] / seconds["cached"], 2),
                "cache_speedup_cpu": round(cpu["uncached"] / cpu["cached"], 2), "threads": torch.get_num_threads(),
                "cache_build_seconds": round(per_batch * len(batches), 1), "steps_timed": len(chosen),
                "steps_per_epoch": len(batches), "first_cached_layer": k,
                "cache_mb": round(cache.nbytes / 2**20, 1)}
