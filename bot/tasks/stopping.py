"""When training stops: validation checks with patience, a wall-clock budget, adaptive epochs.

A classify adapter is scored on (a sample of) its validation split a few times per epoch.
Training stops once ``patience`` checks in a row bring no better score, when the time
budget is spent, or after the planned epochs, whichever comes first; the best checkpoint
is put back at the end. ``Stopper.reason`` says which, for ``metrics.json``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

CHECKS_PER_EPOCH = 3      # validation checks per pass over the training split
MIN_STEPS_BETWEEN = 25    # ... but never closer than this many optimizer steps
FIT_AFTER_STEPS = 10      # steps timed before the schedule is fitted to the budget
VAL_MAX_ROWS = 1000       # validation rows scored per check (a seeded sample of bigger splits)


def auto_epochs(n_items: int, n_labels: int) -> float:
    """Planned passes when ``train.epochs`` is null: more for many labels and small sets.

    Two labels need about one pass over a few thousand examples; TREC's 50 classes needed
    two to stop gaining (78.7 % after one pass, 85.2 % after two: docs/adding-a-task.md).
    The plan is a ceiling: early stopping and the budget end most runs before it.
    """
    by_labels = 2 + n_labels / 10                     # 2 labels: 2.2, 50 labels: 7
    by_size = 3000 / max(1, n_items)                  # at least ~3,000 examples seen
    return float(min(10, max(2, math.ceil(max(by_labels, by_size)))))


def check_every(steps_per_epoch: int, total_steps: int) -> int:
    """Optimizer steps between validation checks."""
    return max(1, min(total_steps, max(MIN_STEPS_BETWEEN, steps_per_epoch // CHECKS_PER_EPOCH)))


@dataclass
class Check:
    step: int
    accuracy: float
    loss: float
    seconds: float

    def better_than(self, other: Check | None) -> bool:
        """Higher accuracy; at equal accuracy, lower validation loss."""
        if other is None:
            return True
        if abs(self.accuracy - other.accuracy) > 1e-9:
            return self.accuracy > other.accuracy
        return self.loss < other.loss - 1e-6


@dataclass
class Stopper:
    """Decides after each optimizer step whether to validate, and whether to stop.

    Args:
        validate: ``() -> (accuracy, loss)`` on the validation sample (None: no checks, so
            only the budget and the planned steps end training).
        params: the trained tensors (LoRA and head); the best check's values are kept.
        budget_s: wall-clock seconds from ``started`` that training may take.
        patience: checks in a row without a better score before stopping (0 = never).
        every: steps between checks.
        started: ``time.perf_counter()`` when the run began (the cache pass counts too).
    """

    validate: object
    params: list
    budget_s: float
    patience: int
    every: int
    started: float = field(default_factory=time.perf_counter)
    checks: list = field(default_factory=list)
    best: Check | None = None
    reason: str = ""
    planned_steps: int = 0
    fitted_steps: int = 0
    _snapshot: list | None = None
    _since_best: int = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def fit_schedule(self, step: int, total: int, loop_started: float) -> int:
        """The number of steps the budget allows, once ``FIT_AFTER_STEPS`` steps are timed.

        Called after each step; fitted after ``FIT_AFTER_STEPS`` steps and again after each
        validation check, with the step time measured so far (never beyond the planned
        steps), so the learning rate decays to zero by the time the budget is spent, not at
        a step it never reaches. Validation time is charged by spreading one check's cost
        over ``every`` steps.
        """
        self.planned_steps = self.planned_steps or total
        due = step == FIT_AFTER_STEPS or (step > FIT_AFTER_STEPS and self.checks
                                          and self.checks[-1].step == step)
        if not due:
            return total
        per_step = (time.perf_counter() - loop_started - sum(c.seconds for c in self.checks)) / step
        per_check = (self.checks[-1].seconds if self.checks else per_step * min(self.every, 20))
        per_step += per_check / self.every if self.validate else 0.0
        allowed = step + int(max(0.0, self.budget_s - self.elapsed()) / max(per_step, 1e-6))
        self.fitted_steps = min(self.planned_steps, max(step + 1, allowed))
        if self.fitted_steps < self.planned_steps and self.fitted_steps != total:
            log.warning("the budget of %.0f min allows about %d of the %d planned steps: the "
                        "learning-rate schedule now ends there (raise --budget for more)",
                        self.budget_s / 60, self.fitted_steps, self.planned_steps)
        return self.fitted_steps

    def after_step(self, step: int, total: int) -> bool:
        """Validate when due (and at the last step); True when training should stop now."""
        last = step >= total
        # the last step is checked too, unless a check ran a few steps before it
        recent = bool(self.checks) and step - self.checks[-1].step < max(1, self.every // 4)
        if self.validate is not None and (step % self.every == 0 or (last and not recent)):
            self._check(step)
        if self.patience and self._since_best >= self.patience:
            self.reason = (f"no better validation score in {self.patience} checks (best at step "
                           f"{self.best.step})")
            return True
        if self.elapsed() >= self.budget_s and not last:
            self.reason = f"time budget of {self.budget_s / 60:.0f} min spent"
            return True
        if last:
            if total < self.planned_steps:
                self.reason = (f"time budget of {self.budget_s / 60:.0f} min: {total} of "
                               f"{self.planned_steps} planned steps")
            else:
                self.reason = "planned epochs done"
        return False

    def _check(self, step: int) -> None:
        t0 = time.perf_counter()
        accuracy, loss = self.validate()
        check = Check(step, float(accuracy), float(loss), time.perf_counter() - t0)
        self.checks.append(check)
        if check.better_than(self.best):
            self.best, self._since_best = check, 0
            self._snapshot = [p.detach().clone() for p in self.params]
        else:
            self._since_best += 1
        log.info("validation at step %d: accuracy %.4f, loss %.4f (best %.4f at step %d)", step,
                 accuracy, loss, self.best.accuracy, self.best.step)

    def restore_best(self) -> bool:
        """Put the best check's weights back; True when they differ from the last step's."""
        if self._snapshot is None or not self.checks or self.checks[-1] is self.best:
            return False
        with torch.no_grad():
            for p, saved in zip(self.params, self._snapshot, strict=True):
                p.copy_(saved)
        return True

    def summary(self) -> dict:
        """What metrics.json records about how training ended."""
        return {
            "stop_reason": self.reason, "budget_minutes": round(self.budget_s / 60, 2),
            "patience": self.patience, "check_every_steps": self.every,
            "planned_steps": self.planned_steps,
            "best_step": self.best.step if self.best else None,
            "best_val_accuracy": round(self.best.accuracy, 4) if self.best else None,
            "validation": [{"step": c.step, "accuracy": round(c.accuracy, 4), "loss": round(c.loss, 4),
                            "seconds": round(c.seconds, 1)} for c in self.checks],
        }
