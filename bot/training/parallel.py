"""Data-parallel training and gradient accumulation through accelerate.

Every process builds the same list of global batches (same seed, same data), takes
its own rows of each (``batch[rank::world]``) and may cut them into ``grad_accum``
micro-batches. Each micro-batch loss is weighted by its share of the global batch
(examples for a classifier, reply tokens for a generator) times the number of
processes, so DDP's gradient *mean* across processes equals the gradient of the
global batch's loss: one process with batch B and N processes with B/N rows each
train the same adapter, up to float rounding (tests/unit/training/test_parallel.py checks it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bot.model.device import resolve_device


def launched_by_accelerate() -> bool:
    """True inside ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Parallel:
    """How one training run is spread over processes.

    Args:
        accelerator: an ``accelerate.Accelerator`` (None: this process alone, no accelerate).
        grad_accum: micro-batches per optimizer step in each process.
    """

    accelerator: object | None = None
    grad_accum: int = 1

    @classmethod
    def create(cls, *, use_accelerate: bool = False, grad_accum: int = 1,
               device: str | None = None) -> Parallel:
        """An accelerate-backed Parallel when asked for or launched by accelerate."""
        if grad_accum < 1:
            raise ValueError(f"--grad-accum must be >= 1, got {grad_accum}")
        if not (use_accelerate or launched_by_accelerate()):
            return cls(None, grad_accum)
        from accelerate import Accelerator  # lazy: accelerate is heavy

        cpu = device is not None and device != "auto" and resolve_device(device).type == "cpu"
        return cls(Accelerator(cpu=cpu or not torch.cuda.is_available()), grad_accum)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes if self.accelerator else 1

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        """The device accelerate gave this process (None without accelerate)."""
        return self.accelerator.device if self.accelerator else None

    def micro_batches(self, batch: list, weight: Callable[[object], float]) -> list[tuple[list, float]]:
        """This process's rows of a global batch as (micro-batch, loss weight) pairs.

        Args:
            weight: an item's share of the batch loss (1 per example, or its token count).
        """
        total = sum(weight(it) for it in batch) or 1.0
        shard = batch[self.rank::self.world]
        if not shard:  # a short last batch: take part in the gradient sync with weight 0
            return [(batch[:1], 0.0)]
        n = min(self.grad_accum, len(shard))
        pieces = [shard[len(shard) * i // n: len(shard) * (i + 1) // n] for i in range(n)]
        return [(p, sum(weight(it) for it in p) * self.world / total) for p in pieces]

    def wrap(self, module: torch.nn.Module, trainable: list[torch.nn.Parameter]) -> torch.nn.Module:
        """DDP-wrap ``module`` (through accelerate) when more than one process trains."""
        if self.world == 1:
            return module
        keep = {id(p) for p in trainable}
        for p in module.parameters():  # DDP syncs exactly the parameters that train
            p.requires_grad_(id(p) in keep)
        return self.accelerator.prepare_model(module, device_placement=False)

    def no_sync(self, model: torch.nn.Module, last: bool):
        """Skip the gradient all-reduce on every micro-batch but the last."""
        if self.world == 1 or last:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def close(self) -> None:
        """Tear the process group down, so no gloo thread outlives the interpreter.

        A worker that returned with the group alive once aborted at exit ("terminate called
        without an active exception", exit -6) after its training had finished.
        """
        if self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def mean(self, value: float) -> float:
        """``value`` averaged over processes (the logged loss)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="mean")[0])


class LossModule(torch.nn.Module):
    """The trainable modules and the loss as one module, so DDP sees every parameter.

    Args:
        modules: the peft model and any task module (a classifier head).
        loss_fn: ``micro-batch -> mean loss``.
    """

    def __init__(self, modules: list[torch.nn.Module], loss_fn: Callable):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(batch)
