"""``classify``: LoRA on the backbone + a linear head on the last token's final state.

The head lives in ``head.safetensors`` inside the adapter folder, next to the LoRA
weights, so saving and loading an adapter never loses it (cf. peft issues #310, #577).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..backbone import last_token_states
from ..errors import AdapterError
from . import register_task
from .base import Task, length_bucketed_batches, lora_parameters, optimise

HEAD_FILE = "head.safetensors"


class ClassifyTask(Task):
    kind = "classify"

    def __init__(self, spec, backbone):
        super().__init__(spec, backbone)
        hidden = backbone.base.config.hidden_size
        # float32 on the backbone's device, whatever the backbone's weight dtype
        self.head = torch.nn.Linear(hidden, max(2, len(spec.labels))).to(backbone.device)

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    def format(self, text: str) -> str:
        return self.spec.template.format(text=text)

    # ------------------------------------------------------------------ I/O
    def save_extra(self, folder) -> None:
        save_file({"weight": self.head.weight.detach().cpu().contiguous(),
                   "bias": self.head.bias.detach().cpu().contiguous()}, str(Path(folder) / HEAD_FILE),
                  metadata={"labels": "\t".join(self.labels)})

    def load_extra(self, folder) -> None:
        path = Path(folder) / HEAD_FILE
        if not path.exists():
            raise AdapterError(f"{path} is missing: a classify adapter needs its head. "
                               f"Fix: retrain with `bot train {self.name}`")
        try:
            state = load_file(str(path))
            self.head.load_state_dict(state)
        except Exception as err:
            raise AdapterError(f"{path} is corrupt or does not match labels {self.labels} "
                               f"and hidden size {self.head.in_features}: {err}") from err

    # ---------------------------------------------------------------- train
    def fit(self, rows: list[dict], epochs: float, seed: int, parallel=None) -> dict:
        """Train LoRA + head on rows ``{"text", "label", ["views"]}``.

        Each row's extra views (e.g. a headline) are added as training examples too.

        Args:
            parallel: a bot.parallel.Parallel (processes, gradient accumulation); None = alone.
        """
        cfg = self.spec.train
        index = {label: i for i, label in enumerate(self.labels)}
        items = []
        for r in rows:
            for text in [r["text"], *r.get("views", {}).values()]:
                items.append((self.format(text), index[r["label"]]))
        tok = self.backbone.tokenizer
        lengths = {t: len(tok(t, truncation=True, max_length=cfg.max_length)["input_ids"])
                   for t, _ in items}
        rng = random.Random(seed)
        torch.manual_seed(seed)
        torch.nn.init.normal_(self.head.weight, std=0.02)
        torch.nn.init.zeros_(self.head.bias)
        batches = length_bucketed_batches(items, lambda it: lengths[it[0]], cfg.batch_size, rng)

        def loss_fn(batch):
            enc = self.backbone.encode([t for t, _ in batch], cfg.max_length)
            out = self.backbone.forward(enc, self.name, output_hidden_states=True, logits_to_keep=1)
            pooled = last_token_states(out.hidden_states[-1], enc["attention_mask"])
            target = torch.tensor([y for _, y in batch], device=pooled.device)
            return torch.nn.functional.cross_entropy(self.head(pooled.float()), target)

        groups = [{"params": lora_parameters(self.backbone, self.name), "lr": cfg.learning_rate},
                  {"params": list(self.head.parameters()), "lr": cfg.head_lr}]
        stats = optimise(self.backbone, self.name, groups, batches, loss_fn, epochs,
                         desc=f"train {self.name}", modules=[self.head], parallel=parallel)
        stats["examples_seen"] = int(round(len(items) * epochs))
        return stats

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
            states = self.backbone.pooled([self.format(texts[i]) for i in idx], adapter, max_length)
            for i, p in zip(idx, self.probs_from_states(states)):
                out[i] = dict(zip(self.labels, p.tolist()))
            if progress:
                progress(len(idx))
        return out

    def evaluate(self, rows: list[dict], max_length: int | None = None, progress=None) -> dict:
        """Accuracy on ``text`` and on each view, with predictions for reports."""
        from ..eval.metrics import classification_metrics

        result = {}
        views = sorted({v for r in rows for v in r.get("views", {})})
        for view in [None, *views]:
            subset = [r for r in rows if view is None or view in r.get("views", {})]
            texts = [r["text"] if view is None else r["views"][view] for r in subset]
            probs = self.predict(texts, max_length=max_length, progress=progress)
            preds = [max(p, key=p.get) for p in probs]
            metrics = classification_metrics([r["label"] for r in subset], preds, self.labels)
            result[view or "text"] = metrics
        return result

    def reply(self, probs: dict[str, float]) -> str:
        label = max(probs, key=probs.get)
        template = self.spec.reply_template or "**{label}** ({score:.2f})"
        return template.format(label=label, score=probs[label])


def analyse(backbone, tasks: list[ClassifyTask], text: str, max_length: int = 128) -> dict:
    """Run every classify adapter on ``text`` in ONE mixed-adapter forward pass.

    Returns ``{adapter_name: {label: prob}}``.
    """
    if not tasks:
        return {}
    formatted = [t.format(text) for t in tasks]
    states = backbone.pooled(formatted, [t.name for t in tasks], max_length)
    return {t.name: dict(zip(t.labels, t.probs_from_states(s[None])[0].tolist()))
            for t, s in zip(tasks, states)}


register_task("classify", ClassifyTask)
