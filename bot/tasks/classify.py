"""``classify``: LoRA on the backbone + a linear head on the last token's final state.

The head lives in ``head.safetensors`` inside the adapter folder, next to the LoRA
weights, so saving and loading an adapter never loses it (cf. peft issues #310, #577).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..backbone import last_token_states
from ..errors import AdapterError
from . import frozen, register_task
from .base import Task, length_bucketed_batches, lora_parameters, optimise

HEAD_FILE = "head.safetensors"
log = logging.getLogger(__name__)


class ClassifyTask(Task):
    kind = "classify"

    def __init__(self, spec, backbone):
        super().__init__(spec, backbone)
        hidden = backbone.base.config.hidden_size
        # no bias: the exported transformers/vLLM `score` layer has none (heads saved
        # with a bias by older versions still load, see load_extra)
        self.head = torch.nn.Linear(hidden, max(2, len(spec.labels)), bias=False).to(backbone.device)

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    def format(self, text: str, max_length: int | None = None) -> str:
        """The prompt for ``text``; with ``max_length``, the text is cut so the prompt's end survives."""
        if max_length is None:
            return self.spec.template.format(text=text)
        return self.backbone.fit_template(self.spec.template, text, max_length)

    # ------------------------------------------------------------------ I/O
    def save_extra(self, folder) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(Path(folder) / HEAD_FILE), metadata={"labels": "\t".join(self.labels)})

    def load_extra(self, folder) -> None:
        path = Path(folder) / HEAD_FILE
        if not path.exists():
            raise AdapterError(f"{path} is missing: a classify adapter needs its head. "
                               f"Fix: retrain with `bot train {self.name}`")
        try:
            state = load_file(str(path))
            if "bias" in state and self.head.bias is None:  # a head saved before heads lost their bias
                self.head = torch.nn.Linear(self.head.in_features, self.head.out_features,
                                            bias=True).to(self.backbone.device)
            self.head.load_state_dict(state)
        except Exception as err:
            raise AdapterError(f"{path} is corrupt or does not match labels {self.labels} "
                               f"and hidden size {self.head.in_features}: {err}") from err

    # ---------------------------------------------------------------- train
    def _items(self, rows: list[dict]) -> list[tuple[str, int]]:
        """(formatted text, label index) for each row, and each extra view as often as
        ``train.view_repeats`` says.

        A view such as a headline is a few tokens against an article's 256, so repeating it
        trains the short form more for little time.
        """
        index = {label: i for i, label in enumerate(self.labels)}
        cfg = self.spec.train
        items = []
        for r in rows:
            label = index[r["label"]]
            items.append((self.format(r["text"], cfg.max_length), label))
            for name, view in r.get("views", {}).items():
                items += [(self.format(view, cfg.max_length), label)] * cfg.repeats(name)
        return items

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

    def fit(self, rows: list[dict], epochs: float, seed: int, cache: bool | None = None,
            parallel=None) -> dict:
        """Train LoRA + head on rows ``{"text", "label", ["views"]}``.

        Each row's extra views (e.g. a headline) are added as training examples too.

        Args:
            cache: None = cache the frozen layers when ``frozen.plan`` allows it;
                False = always run the whole model (the reference path).
            parallel: a bot.parallel.Parallel (processes, gradient accumulation); None = alone.
        Returns:
            optimise()'s stats plus ``path`` (cached/uncached), ``path_reason`` and, when
            cached, ``cache_seconds``, ``cache_mb`` and ``cache_where``.
        """
        cfg = self.spec.train
        items = self._items(rows)
        batches, lengths = self._batches(items, seed)
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
        try:
            stats = optimise(self.backbone, self.name, groups, batches, loss_fn, epochs,
                             desc=f"train {self.name} ({extra['path']})", modules=[self.head],
                             parallel=parallel)
        finally:
            if states is not None:
                states.close()
        stats["examples_seen"] = int(round(len(items) * epochs))
        stats["epoch_seconds"] = round(stats["seconds"] / epochs, 1)
        return {**stats, **extra}

    def time_paths(self, rows: list[dict], steps: int, seed: int = 0) -> dict:
        """Seconds per training epoch, uncached vs cached, timed side by side.

        Runs ``steps`` optimiser steps of each path, alternating (uncached, cached) on
        the same batches, so a busy machine slows both alike; wall-clock and process CPU
        seconds are both kept. The one-off cache pass is timed separately. Call on a
        fresh, throwaway adapter: it trains it.
        """
        items = self._items(rows)
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

    # ---------------------------------------------------------------- infer
    @torch.inference_mode()
    def probs_from_states(self, states: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(states.float().to(self.head.weight.device)), dim=-1).cpu()

    def predict(self, texts: list[str], batch_size: int = 16, max_length: int | None = None,
                progress=None, adapter: str | None = "__self__") -> list[dict[str, float]]:
        """Every label's probability for each text (``adapter=None`` runs the bare backbone)."""
        adapter = self.name if adapter == "__self__" else adapter
        max_length = max_length or self.spec.train.max_length
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[dict | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            states = self.backbone.pooled([self.format(texts[i], max_length) for i in idx], adapter,
                                          max_length)
            for i, p in zip(idx, self.probs_from_states(states)):
                out[i] = dict(zip(self.labels, p.tolist()))
            if progress:
                progress(len(idx))
        return out

    def evaluate(self, rows: list[dict], max_length: int | None = None, progress=None,
                 predictions: dict | None = None) -> dict:
        """Accuracy on ``text`` and on each view, with predictions for reports.

        Args:
            predictions: when given, filled with each view's predicted labels in row order
                (``bot eval`` scores them again with the router choosing the adapter)."""
        from ..eval.metrics import classification_metrics

        result = {}
        views = sorted({v for r in rows for v in r.get("views", {})})
        for view in [None, *views]:
            subset = [r for r in rows if view is None or view in r.get("views", {})]
            texts = [r["text"] if view is None else r["views"][view] for r in subset]
            probs = self.predict(texts, max_length=max_length, progress=progress)
            preds = [max(p, key=p.get) for p in probs]
            if predictions is not None:
                predictions[view or "text"] = preds
            metrics = classification_metrics([r["label"] for r in subset], preds, self.labels)
            result[view or "text"] = metrics
        return result

    def reply(self, probs: dict[str, float]) -> str:
        label = max(probs, key=probs.get)
        template = self.spec.reply_template or "**{label}** ({score:.2f})"
        return template.format(label=label, score=probs[label])


register_task("classify", ClassifyTask)
