"""Shared pieces of every task kind: the optimisation loop and batching."""

from __future__ import annotations

import math
import random
import time

import torch
from tqdm.auto import tqdm

from bot.training.parallel import LossModule, Parallel


class Task:
    """One adapter's task logic on a Backbone.

    Args:
        spec: the AdapterSpec.
        backbone: the Backbone carrying (or about to carry) the adapter ``spec.name``.
    """

    kind = ""

    def __init__(self, spec, backbone):
        self.spec = spec
        self.backbone = backbone

    @property
    def name(self) -> str:
        return self.spec.name

    def save_extra(self, folder) -> None:
        """Write task-specific files beside the LoRA weights."""

    def load_extra(self, folder) -> None:
        """Read what ``save_extra`` wrote."""


def length_bucketed_batches(items: list, length, batch_size: int, rng: random.Random) -> list[list]:
    """Shuffle, then sort within windows of 16 batches so each batch pads little."""
    items = list(items)
    rng.shuffle(items)
    window = batch_size * 16
    batches = []
    for start in range(0, len(items), window):
        chunk = sorted(items[start:start + window], key=length)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def lora_parameters(backbone, name: str) -> list[torch.nn.Parameter]:
    params = [p for n, p in backbone.peft.named_parameters() if "lora_" in n and f".{name}." in n]
    for p in params:
        p.requires_grad_(True)
    return params


def optimise(backbone, name: str, groups: list[dict], batches: list, loss_fn, epochs: float,
             desc: str, log_every: int = 1, *, modules: list | None = None, weight=None,
             parallel=None, stopper=None) -> dict:
    """AdamW with linear warm-up (6 %) and linear decay; a tqdm bar shows loss and ETA.

    Args:
        groups: optimizer parameter groups (each with its own ``lr``).
        batches: one epoch of global batches; ``epochs`` may be fractional.
        loss_fn: ``batch -> mean loss`` over the batch's items.
        modules: task modules trained beside the LoRA weights (a classifier head).
        weight: ``item -> its share of a batch's loss`` (default 1 per item); micro-batches
            are weighted by it, so accumulation and data parallelism keep the loss exact.
        parallel: a bot.training.parallel.Parallel (processes, gradient accumulation); None = alone.
        stopper: a bot.tasks.stopping.Stopper: validation checks, patience and the time
            budget (the schedule is fitted to it); the best checkpoint is restored at the end.
    Returns:
        {"steps", "seconds", "final_loss", "losses"}, and with a stopper its ``summary()``.
    """
    parallel = parallel or Parallel()
    weight = weight or (lambda item: 1.0)
    total = max(1, math.ceil(len(batches) * epochs))
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = max(1, int(0.06 * total))
    plan = {"total": total}  # the schedule's length: the budget may shorten it
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (plan["total"] - s) / max(1, plan["total"] - warm))))
    if stopper is not None:
        stopper.planned_steps = total
    # fp16 autocast (GPUs without bf16) needs loss scaling; bf16 and fp32 do not
    scaler = torch.amp.GradScaler(backbone.device.type,
                                  enabled=backbone.compute_dtype == torch.float16)
    losses, ema = [], None
    t0 = time.perf_counter()
    backbone.peft.train()
    try:
        with backbone.lock:
            backbone.peft.set_adapter(name)
            model = parallel.wrap(LossModule([backbone.peft, *(modules or [])], loss_fn), params)
            bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True,
                       disable=not parallel.is_main)
            step = 0
            while step < plan["total"]:
                pieces = parallel.micro_batches(batches[step % len(batches)], weight)
                step_loss = 0.0
                for i, (piece, share) in enumerate(pieces):
                    with parallel.no_sync(model, last=i == len(pieces) - 1):
                        loss = model(piece) * share
                        scaler.scale(loss).backward()
                    step_loss += loss.item()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                scaler.step(opt)
                scaler.update()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(parallel.mean(step_loss))
                ema = losses[-1] if ema is None else 0.9 * ema + 0.1 * losses[-1]
                step += 1
                bar.update(1)
                if step % log_every == 0:
                    bar.set_postfix(_postfix(ema, stopper))
                if stopper is None:
                    continue
                backbone.peft.eval()  # no dropout while validating
                stop = stopper.after_step(step, plan["total"])
                backbone.peft.train()
                if stop:
                    break
                fitted = stopper.fit_schedule(step, plan["total"], t0)
                if fitted != plan["total"]:
                    plan["total"] = fitted
                    bar.total = fitted
                    bar.refresh()
            bar.close()
            if stopper is not None:
                stopper.restore_best()
    finally:
        backbone.peft.eval()
    out = {"steps": step, "seconds": time.perf_counter() - t0,
           "final_loss": ema, "losses": losses[:: max(1, len(losses) // 200)]}
    return {**out, **stopper.summary()} if stopper is not None else out


def _postfix(ema: float, stopper) -> dict:
    """The progress bar's tail: smoothed loss, best validation accuracy, budget used."""
    out = {"loss": f"{ema:.4f}"}
    if stopper is not None:
        if stopper.best is not None:
            out["val"] = f"{stopper.best.accuracy:.3f}"
        out["budget"] = f"{stopper.elapsed() / 60:.1f}/{stopper.budget_s / 60:.0f} min"
    return out
