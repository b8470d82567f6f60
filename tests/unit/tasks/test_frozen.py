"""Cached frozen layers: same losses and predictions as the full model; bias-free heads."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import WORDS, task_on_fresh_backbone
from safetensors.torch import save_file

from bot.tasks import frozen
from bot.tasks.classify import HEAD_FILE


def rows(n=64, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choice(sorted(WORDS))
        # uneven lengths, so batches carry padding; some rows carry an extra view
        text = f"the {rng.choice(WORDS[label])} " + "and more " * rng.randint(0, 4) + f"number {i}"
        row = {"text": text, "label": label}
        if i % 3 == 0:
            row["views"] = {"headline": rng.choice(WORDS[label])}
        out.append(row)
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5),
                                       pytest.param(torch.bfloat16, 2e-2, marks=pytest.mark.slow)])
def test_cached_training_matches_uncached(dtype, tol):
    data = rows()
    texts = [r["text"] for r in data[:10]] + ["woof", "a purr"]
    results = {}
    for cache in (False, None):
        task = task_on_fresh_backbone(dtype=dtype)
        stats = task.fit(data, 2.0, seed=0, cache=cache)
        results[stats["path"]] = (stats, task.predict(texts))
    (plain, plain_pred), (cached, cached_pred) = results["uncached"], results["cached"]
    assert "layer 2 of 4" in cached["path_reason"] and cached["cache_where"] == "memory"
    assert len(plain["losses"]) == len(cached["losses"]) == plain["steps"]
    assert cached["losses"] == pytest.approx(plain["losses"], abs=tol, rel=tol)
    assert plain["losses"][-1] < plain["losses"][0]  # it did learn, so the curves are not flat
    for a, b in zip(plain_pred, cached_pred):
        assert max(a, key=a.get) == max(b, key=b.get)
        assert b["cat"] == pytest.approx(a["cat"], abs=max(tol, 1e-5))


def test_cache_keeps_each_distinct_prompt_once_and_still_matches_uncached():
    data = rows(32)
    data[1]["text"] = data[0]["text"]  # two rows with the same text
    results = {}
    for cache in (False, None):
        task = task_on_fresh_backbone(dropout=0.0)
        task.spec.train.view_repeats = 3
        results[cache] = task.fit(data, 1.0, seed=0, cache=cache)
    items, _ = task._items(data)
    distinct = {t for t, _ in items}
    assert len(items) == 32 + 3 * 11 and len(distinct) < len(items)
    lengths = task._batches(items, 0)[1]
    states = task.build_cache(items, lengths, 2)
    first = {t: i for i, (t, _) in reversed(list(enumerate(items)))}
    width = task.backbone.base.config.hidden_size * 4  # bytes per token (float32)
    assert states.nbytes == sum(lengths[first[t]] for t in distinct) * width
    same = [i for i, (t, _) in enumerate(items) if t == items[0][0]]
    assert len(same) == 2 and len(set(states.rows(same))) == 1
    hidden, mask = states.batch(states.rows([0, 5]))
    enc = task.backbone.encode([items[0][0], items[5][0]], 40)
    full = frozen.lower_states(task.backbone, "pets", enc, 2)
    for row in range(2):
        n = int(mask[row].sum())
        assert n == int(enc["attention_mask"][row].sum())
        assert torch.allclose(hidden[row, :n], full[row, :n], atol=1e-5)
    assert results[None]["losses"] == pytest.approx(results[False]["losses"], abs=1e-5, rel=1e-5)


def test_cache_in_a_memory_mapped_file_gives_the_same_losses(tmp_path, monkeypatch):
    data = rows(32)
    memory = task_on_fresh_backbone(dropout=0.0).fit(data, 1.0, seed=1)
    monkeypatch.setenv("BOT_CACHE", str(tmp_path))
    monkeypatch.setenv(frozen.BUDGET_ENV, "0")
    mapped = task_on_fresh_backbone(dropout=0.0).fit(data, 1.0, seed=1)
    assert mapped["cache_where"].startswith("memory-mapped file")
    assert mapped["losses"] == pytest.approx(memory["losses"], abs=1e-6)
    assert not list((tmp_path / "train-states").iterdir()), "the states file is deleted after training"


def test_uncached_when_lora_covers_every_layer_or_the_model_is_unknown():
    task = task_on_fresh_backbone(layers=None)
    k, reason = frozen.plan(task.backbone, "pets")
    assert k is None and "layer 0" in reason
    assert task.fit(rows(16), 0.5, seed=0)["path"] == "uncached"
    task = task_on_fresh_backbone()
    task.backbone.base.config.model_type = "mystery"
    k, reason = frozen.plan(task.backbone, "pets")
    assert k is None and "mystery" in reason


def test_time_paths_reports_both_paths():
    task = task_on_fresh_backbone()
    out = task.time_paths(rows(48), steps=3)
    assert out["steps_timed"] == 3 and out["first_cached_layer"] == 2
    assert out["uncached_epoch_seconds"] > 0 and out["cached_epoch_seconds"] > 0
    assert out["cache_speedup"] == pytest.approx(out["uncached_epoch_seconds"] / out["cached_epoch_seconds"],
                                                 rel=0.1)


def test_new_heads_have_no_bias_and_old_heads_with_a_bias_still_load(tmp_path):
    task = task_on_fresh_backbone()
    assert task.head.bias is None
    task.save_extra(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / HEAD_FILE), framework="pt") as fh:
        assert sorted(fh.keys()) == ["weight"]
    # a head written by an older version: weight + bias
    weight = torch.randn(2, task.head.in_features)
    bias = torch.tensor([5.0, -5.0])  # strong enough to decide every prediction
    save_file({"weight": weight, "bias": bias}, str(tmp_path / HEAD_FILE))
    old = task_on_fresh_backbone()
    old.load_extra(tmp_path)
    assert torch.equal(old.head.bias.detach(), bias)
    assert all(max(p, key=p.get) == "cat" for p in old.predict(["woof", "meow"]))


def test_time_cache_is_recorded_and_kept_by_a_retrain_with_the_same_settings(tmp_path, monkeypatch):
    import json

    from helpers import make_tiny_backbone, toy_spec

    from bot.training.train import time_cache, train_adapter

    spec = toy_spec(tmp_path, epochs=1.0)
    spec = spec.replace(lora=spec.lora.__class__(r=4, target_modules=["q_proj", "v_proj"], layers=[1]))
    spec.save(spec.folder)
    train_adapter(spec, make_tiny_backbone(), spec.folder)
    result = time_cache(spec, make_tiny_backbone(), steps=2)
    saved = json.loads((spec.folder / "metrics.json").read_text())
    assert saved["cache_speedup"] == result["cache_speedup"] > 0
    assert saved["cache_timing"]["first_cached_layer"] == 1
    train_adapter(spec, make_tiny_backbone(), spec.folder, epochs=2.0)  # same settings: kept
    assert json.loads((spec.folder / "metrics.json").read_text())["cache_speedup"] == result["cache_speedup"]
    spec.train.max_length = 24  # per-epoch time changes: the old figure is dropped
    train_adapter(spec, make_tiny_backbone(), spec.folder)
    assert "cache_speedup" not in json.loads((spec.folder / "metrics.json").read_text())
