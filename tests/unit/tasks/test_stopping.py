"""Training that stops when it has learned (bot.tasks.stopping): patience, the budget, automatic
epochs, validation, and the manifest keys that set them.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from helpers import WORDS, task_on_fresh_backbone

from bot.errors import SpecError
from bot.manifests.spec import AdapterSpec
from bot.tasks import stopping


def _stopper(scores, patience=2, budget_s=1e9, every=1):
    calls = iter(scores)
    weight = torch.zeros(3)
    stopper = stopping.Stopper(validate=lambda: next(calls), params=[weight], budget_s=budget_s,
                               patience=patience, every=every)
    return stopper, weight


def test_training_stops_after_patience_checks_without_a_better_score_and_keeps_the_best():
    # accuracy, loss per check: best at step 2 (a tie on accuracy loses on loss at step 3)
    stopper, weight = _stopper([(0.5, 1.0), (0.6, 0.8), (0.6, 0.9), (0.55, 0.7), (0.7, 0.1)])
    stopper.planned_steps = 10
    stopped_at = None
    for step in range(1, 11):
        weight.fill_(step)
        if stopper.after_step(step, 10):
            stopped_at = step
            break
    assert stopped_at == 4 and stopper.best.step == 2
    assert "no better validation score in 2 checks" in stopper.reason
    assert stopper.restore_best() and torch.equal(weight, torch.full((3,), 2.0))
    summary = stopper.summary()
    assert summary["best_step"] == 2 and len(summary["validation"]) == 4


def test_the_budget_ends_training_and_shortens_the_schedule():
    stopper, _ = _stopper([(0.5, 1.0)] * 100, patience=0, budget_s=0.0)
    stopper.planned_steps = 50
    assert stopper.after_step(1, 50) and "time budget" in stopper.reason
    # fitted after FIT_AFTER_STEPS: with 1 s left and 1 s per step, few steps remain
    stopper, _ = _stopper([], patience=0, budget_s=10.0, every=1000)
    stopper.validate = None
    stopper.planned_steps = 500
    loop_started = stopper.started - stopping.FIT_AFTER_STEPS * 0.9  # 0.9 s per step so far
    fitted = stopper.fit_schedule(stopping.FIT_AFTER_STEPS, 500, loop_started)
    assert stopping.FIT_AFTER_STEPS < fitted < 25
    assert stopper.fit_schedule(stopping.FIT_AFTER_STEPS + 1, fitted, loop_started) == fitted
    # refitted after a check: more time left now, so it grows back, but never past the plan
    stopper.checks.append(stopping.Check(step=20, accuracy=0.5, loss=1.0, seconds=0.0))
    stopper.budget_s = 1e6
    assert stopper.fit_schedule(20, fitted, loop_started) == 500


def test_automatic_epochs_grow_with_labels_and_shrink_with_data():
    assert stopping.auto_epochs(13_000, 2) == 3
    assert stopping.auto_epochs(3_800, 50) == 7
    assert stopping.auto_epochs(300, 2) == 10
    assert stopping.auto_epochs(100_000, 500) == 10
    assert all(2 <= stopping.auto_epochs(n, k) <= 10 for n in (10, 1000, 10**6) for k in (2, 20, 200))


def test_fit_with_validation_records_why_it_stopped_and_uses_every_example():
    rng = random.Random(1)
    data = [{"text": f"the {rng.choice(WORDS[lab])} {i}", "label": lab}
            for i, lab in enumerate(rng.choice(sorted(WORDS)) for _ in range(48))]
    for cache in (False, None):
        task = task_on_fresh_backbone()
        stats = task.fit(data[:32], None, seed=0, cache=cache, val_rows=data[32:])
        assert stats["stop_reason"] and stats["validation"]
        assert stats["epochs_planned"] == stopping.auto_epochs(32, 2)
        assert stats["steps"] <= stats["planned_steps"] == math.ceil(4 * stats["epochs_planned"])
        assert stats["val_rows"] == 16 and stats["train_items"] == 32
        assert 0.0 <= stats["best_val_accuracy"] <= 1.0


def test_manifest_checks_name_the_new_training_keys():
    base = {"name": "x", "kind": "classify", "labels": ["a", "b"]}
    assert AdapterSpec.from_dict({**base, "train": {"epochs": None}}).train.epochs is None
    for key, value in (("patience", -1), ("budget_minutes", 0), ("max_windows", 0), ("epochs", 0)):
        with pytest.raises(SpecError, match=f"train.{key}"):
            AdapterSpec.from_dict({**base, "train": {key: value}})


def test_the_last_step_is_not_checked_again_right_after_a_check():
    stopper, weight = _stopper([(0.5, 1.0), (0.6, 0.5), (0.7, 0.1)], patience=0, every=10)
    stopper.planned_steps = 21
    for step in range(1, 22):
        weight.fill_(step)
        stopper.after_step(step, 21)
    assert [c.step for c in stopper.checks] == [10, 20]  # 21 is within a quarter of `every` of 20
    stopper, _ = _stopper([(0.5, 1.0), (0.6, 0.5)], patience=0, every=10)
    stopper.planned_steps = 15
    for step in range(1, 16):
        stopper.after_step(step, 15)
    assert [c.step for c in stopper.checks] == [10, 15]
