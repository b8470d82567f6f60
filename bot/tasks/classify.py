"""``classify``: LoRA on the backbone + a linear head on the last token's final state.

The head lives in ``head.safetensors`` inside the adapter folder, next to the LoRA
weights, so saving and loading an adapter never loses it (cf. peft issues #310, #577).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bot.engine.pooling import pool_windows
from bot.errors import AdapterError
from bot.tasks.base import Task
from bot.tasks.classify_training import ClassifyTraining
from bot.tasks.kinds import register_task

HEAD_FILE = "head.safetensors"


class ClassifyTask(ClassifyTraining, Task):
    """Inputs (prompts, windows), the head's file, prediction and scores; training is
    ``ClassifyTraining``'s job."""

    kind = "classify"

    def __init__(self, spec, backbone):
        super().__init__(spec, backbone)
        hidden = backbone.base.config.hidden_size
        # no bias: the exported transformers/vLLM `score` layer has none (heads saved
        # with a bias by older versions still load, see load_extra)
        self.last_windows: list[int] = []  # windows per text of the last predict() call
        self.head = torch.nn.Linear(hidden, max(2, len(spec.labels)), bias=False).to(backbone.device)

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    def format(self, text: str, max_length: int | None = None) -> str:
        """The prompt for ``text``; with ``max_length``, the text is cut so the prompt's end survives."""
        if max_length is None:
            return self.spec.template.format(text=text)
        return self.backbone.fit_template(self.spec.template, text, max_length)

    def prompts(self, text: str, max_length: int | None = None) -> list[str]:
        """The prompts that read ``text`` whole: one, or overlapping windows of a long text
        (``train.max_windows``; see ``_PaddedTokenizer.windows``)."""
        cfg = self.spec.train
        return self.backbone.windows(self.spec.template, text, max_length or cfg.max_length,
                                     cfg.max_windows)

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
    def _items(self, rows: list[dict], repeat: bool = True) -> tuple[list[tuple[str, int]], list[int]]:
        """(prompt, label index) items for ``rows``, and the text each item reads (its group).

        A long text gives one item per window (each labelled as the text: training learns
        from all of it, and validation pools the windows as inference does). Each extra view
        is added as often as ``train.view_repeats`` says (``repeat=False``: once, for
        validation; a view never trained on is not validated on either). A view such as a headline is a few tokens against an article's 256, so
        repeating it trains the short form more for little time.
        """
        index = {label: i for i, label in enumerate(self.labels)}
        cfg = self.spec.train
        items, groups = [], []

        def add(text: str, label: int, times: int = 1) -> None:
            group = groups[-1] + 1 if groups else 0
            for prompt in self.prompts(text):
                items.extend([(prompt, label)] * times)
                groups.extend([group] * times)

        for r in rows:
            label = index[r["label"]]
            add(r["text"], label)
            for name, view in r.get("views", {}).items():
                times = cfg.repeats(name) if repeat else min(1, cfg.repeats(name))
                if times:
                    add(view, label, times)
        return items, groups

    # ---------------------------------------------------------------- infer
    @torch.inference_mode()
    def probs_from_states(self, states: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(states.float().to(self.head.weight.device)), dim=-1).cpu()

    def predict(self, texts: list[str], batch_size: int = 16, max_length: int | None = None,
                progress=None, adapter: str | None = "__self__") -> list[dict[str, float]]:
        """Every label's probability for each text (``adapter=None`` runs the bare backbone).

        A text longer than ``max_length`` is read whole, as windows (``prompts``) whose
        predictions ``pool_windows`` combines; ``self.last_windows`` keeps each text's count.
        """
        adapter = self.name if adapter == "__self__" else adapter
        max_length = max_length or self.spec.train.max_length
        prompts = [self.prompts(t, max_length) for t in texts]
        self.last_windows = [len(p) for p in prompts]
        flat = [(i, p) for i, ps in enumerate(prompts) for p in ps]
        order = sorted(range(len(flat)), key=lambda j: len(flat[j][1]))
        log_probs: list = [None] * len(flat)
        left = list(self.last_windows)  # windows not yet run, per text (for progress)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            states = self.backbone.pooled([flat[j][1] for j in idx], adapter, max_length)
            for j, row in zip(idx, self.log_probs_from_states(states)):
                log_probs[j] = row
            if progress:
                done = 0
                for j in idx:
                    left[flat[j][0]] -= 1
                    done += left[flat[j][0]] == 0
                progress(done)
        if not flat:
            return []
        pooled = pool_windows(torch.stack(log_probs), [i for i, _ in flat]).exp()
        return [dict(zip(self.labels, p.tolist())) for p in pooled]

    @torch.inference_mode()
    def log_probs_from_states(self, states: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head(states.float().to(self.head.weight.device)), dim=-1).cpu()

    def evaluate(self, rows: list[dict], max_length: int | None = None, progress=None,
                 predictions: dict | None = None) -> dict:
        """Accuracy on ``text`` and on each view, with predictions for reports.

        Args:
            predictions: when given, filled with each view's predicted labels in row order
                (``bot eval`` scores them again with the router choosing the adapter)."""
        # lazy: bot.eval.metrics imports sklearn
        from bot.eval.metrics import classification_metrics

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
            windows = self.last_windows
            if len(windows) != len(texts):  # predict was replaced (tests, reports): count again
                windows = [len(self.prompts(t, max_length)) for t in texts]
            limit = self.spec.train.max_windows
            metrics["windowed"] = {"texts": sum(n > 1 for n in windows), "windows": sum(windows),
                                   "max_windows": limit,
                                   "at_limit": sum(n >= limit > 1 and self._cut(t, max_length)
                                                   for n, t in zip(windows, texts))}
            result[view or "text"] = metrics
        return result

    def _cut(self, text: str, max_length: int | None = None) -> bool:
        """True when ``text`` needs more windows than ``train.max_windows`` (its end goes unread)."""
        cfg = self.spec.train
        return len(self.backbone.windows(self.spec.template, text, max_length or cfg.max_length,
                                         cfg.max_windows + 1)) > cfg.max_windows

    def reply(self, probs: dict[str, float]) -> str:
        label = max(probs, key=probs.get)
        template = self.spec.reply_template or "**{label}** ({score:.2f})"
        return template.format(label=label, score=probs[label])


register_task("classify", ClassifyTask)
