"""``generate``: LoRA trained on dialogue replies through the backbone's chat template.

The loss covers the reply tokens only (and the end-of-turn token), never the prompt,
so the adapter learns how to answer, not how users ask.
"""

from __future__ import annotations

import math
import random

import torch

from bot.tasks.base import Task, length_bucketed_batches, lora_parameters, optimise
from bot.tasks.kinds import register_task

IGNORE = -100


class GenerateTask(Task):
    kind = "generate"

    @property
    def adapter_name(self) -> str | None:
        """The LoRA adapter that generates (None: the bare backbone)."""
        return self.name

    def messages(self, prompt: str, history: list[dict] | None = None) -> list[dict]:
        """Chat messages for a prompt; the manifest's template is the system prompt."""
        msgs = []
        if self.spec.template and self.spec.template != "{text}":
            msgs.append({"role": "system", "content": self.spec.template})
        return msgs + list(history or []) + [{"role": "user", "content": prompt}]

    def prompt_ids(self, prompt: str, history: list[dict] | None = None,
                   max_prompt_tokens: int = 1536) -> torch.Tensor:
        """Token ids ending with the assistant header; drops the oldest turns to fit."""
        history = list(history or [])
        tok = self.backbone.tokenizer
        while True:
            ids = tok.apply_chat_template(self.messages(prompt, history), add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
            if ids.shape[1] <= max_prompt_tokens or not history:
                return ids[:, -max_prompt_tokens:]
            history = history[2:]  # one user+assistant exchange at a time

    def encode_pair(self, prompt: str, reply: str, max_length: int) -> tuple[list[int], list[int]]:
        """(input ids, labels) with labels = -100 over the prompt part."""
        tok = self.backbone.tokenizer
        head = tok.apply_chat_template(self.messages(prompt), add_generation_prompt=True,
                                       tokenize=False)
        end = tok.eos_token or ""
        p_ids = tok(head, add_special_tokens=False)["input_ids"]
        r_ids = tok(reply + end, add_special_tokens=False)["input_ids"]
        p_ids = p_ids[-max(8, max_length - len(r_ids)):]  # keep the end of a long prompt
        ids = (p_ids + r_ids)[:max_length]
        labels = ([IGNORE] * len(p_ids) + r_ids)[:max_length]
        return ids, labels

    def _collate(self, pairs: list[tuple[list[int], list[int]]]) -> dict:
        width = max(len(ids) for ids, _ in pairs)
        pad = self.backbone.tokenizer.pad_token_id
        ids = torch.full((len(pairs), width), pad)
        labels = torch.full((len(pairs), width), IGNORE)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (x, y) in enumerate(pairs):
            ids[i, :len(x)] = torch.tensor(x)
            labels[i, :len(y)] = torch.tensor(y)
            mask[i, :len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    # ---------------------------------------------------------------- train
    def fit(self, rows: list[dict], epochs: float, seed: int, parallel=None) -> dict:
        """Train the LoRA weights on rows ``{"prompt", "reply"}`` (loss on reply tokens only).

        Args:
            parallel: a bot.training.parallel.Parallel (processes, gradient accumulation); None = alone.
        """
        cfg = self.spec.train
        items = [self.encode_pair(r["prompt"], r["reply"], cfg.max_length) for r in rows]
        rng = random.Random(seed)
        torch.manual_seed(seed)
        batches = length_bucketed_batches(items, lambda it: len(it[0]), cfg.batch_size, rng)

        def loss_fn(batch):
            enc = self._collate(batch)
            labels = enc.pop("labels")
            out = self.backbone.forward(enc, self.name)
            return _shifted_nll(out.logits, labels).sum() / (labels[:, 1:] != IGNORE).sum().clamp(min=1)

        groups = [{"params": lora_parameters(self.backbone, self.name), "lr": cfg.learning_rate}]
        # each item weighs its reply tokens, so micro-batches add up to the batch's token mean
        stats = optimise(self.backbone, self.name, groups, batches, loss_fn, epochs,
                         desc=f"train {self.name}", parallel=parallel,
                         weight=lambda it: sum(y != IGNORE for y in it[1][1:]))
        stats["examples_seen"] = int(round(len(items) * epochs))
        return stats

    # ------------------------------------------------------------- evaluate
    @torch.inference_mode()
    def perplexity(self, rows: list[dict], adapter: str | None = "__self__", batch_size: int = 16,
                   progress=None, logits=None, max_length: int | None = None) -> float:
        """Held-out perplexity of the reference replies (``adapter=None``: bare backbone).

        Args:
            logits: ``batch -> logits`` to score with another model (e.g. a fast-path engine)
                instead of the backbone with ``adapter``.
            max_length: tokens per example (default: the manifest's ``train.max_length``).
        """
        adapter = self.adapter_name if adapter == "__self__" else adapter
        logits = logits or (lambda enc: self.backbone.forward(enc, adapter).logits)
        items = [self.encode_pair(r["prompt"], r["reply"], max_length or self.spec.train.max_length)
                 for r in rows]
        items.sort(key=lambda it: len(it[0]))
        total, count = 0.0, 0
        for start in range(0, len(items), batch_size):
            enc = self._collate(items[start:start + batch_size])
            labels = enc.pop("labels")
            nll = _shifted_nll(logits(enc), labels)
            total += float(nll.sum())
            count += int((labels[:, 1:] != IGNORE).sum())
            if progress:
                progress(len(items[start:start + batch_size]))
        return math.exp(total / max(1, count))

    def evaluate(self, rows: list[dict], progress=None) -> dict:
        base = self.perplexity(rows, adapter=None, progress=progress)
        tuned = self.perplexity(rows, progress=progress)
        return {"n": len(rows), "ppl_base": base, "ppl_adapter": tuned,
                "ppl_change": tuned / base - 1.0}

    # ---------------------------------------------------------------- reply
    def generate(self, prompt: str, history=None, adapter: str | None = "__self__",
                 max_new_tokens: int = 128, repetition_penalty: float = 1.1, **sampling) -> str:
        """A greedy reply through the backbone's engine (``sampling``: more SamplingParams)."""
        from bot.engine import SamplingParams  # lazy: bot.engine imports transformers

        adapter = self.adapter_name if adapter == "__self__" else adapter
        tok = self.backbone.tokenizer
        if self.backbone.quantized:  # 8/4-bit: no plain weights for the engine; decode unmerged
            new = peft_generate(self.backbone, self.prompt_ids(prompt, history), adapter,
                                max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
            return tok.decode(new[0], skip_special_tokens=True).strip()
        ids = self.prompt_ids(prompt, history)[0].tolist()
        params = SamplingParams(max_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                                **sampling)
        return self.backbone.engine().generate(ids, adapter, params).strip()


def peft_generate(backbone, input_ids: torch.Tensor, adapter: str | None, **kwargs) -> torch.Tensor:
    """Greedy ``generate()`` on the backbone's own peft model (8/4-bit backbones); new ids only."""
    kwargs.setdefault("pad_token_id", backbone.tokenizer.pad_token_id)
    ids = input_ids.to(backbone.device)
    with backbone.lock, torch.inference_mode():
        model = backbone.peft if backbone.peft is not None else backbone.base
        if backbone.peft is not None and adapter is not None:
            backbone.peft.set_adapter(adapter)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)
        elif backbone.peft is not None:
            with backbone.peft.disable_adapter():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     **kwargs)
        else:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)
    return out[:, ids.shape[1]:].cpu()


def _shifted_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood (0 where the label is ignored)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            target.reshape(-1), ignore_index=IGNORE,
                                            reduction="none")
    return nll.view(target.shape)


register_task("generate", GenerateTask)
