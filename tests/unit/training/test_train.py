"""Training, saving and reloading adapters on the tiny model; atomic saves."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_tiny_backbone, toy_spec

from bot.manifests.registry import load_all, load_task
from bot.manifests.spec import AdapterSpec
from bot.training.train import save_adapter_folder, train_adapter


def test_classify_trains_well_above_chance(tmp_path):
    bb = make_tiny_backbone()
    spec = toy_spec(tmp_path)
    metrics = train_adapter(spec, bb, spec.folder, command="pytest")
    acc = metrics["heldout"]["text"]["accuracy"]
    assert acc >= 0.85, f"held-out accuracy {acc} on a separable task"
    saved = json.loads((spec.folder / "metrics.json").read_text())
    assert saved["command"] == "pytest" and saved["examples_seen"] > 0
    assert saved["backbone"]["fingerprint"] == bb.fingerprint
    # held-out rows never reach training
    assert saved["split_sizes"]["test"] > 0


def test_round_trip_gives_identical_predictions(tmp_path):
    bb = make_tiny_backbone()
    spec = toy_spec(tmp_path, epochs=1.0)
    train_adapter(spec, bb, spec.folder)
    texts = ["the meow number 3", "the bark number 7", "unrelated words"]
    task = bb_task(bb, spec)
    before = task.predict(texts)
    fresh = make_tiny_backbone()
    reloaded = load_task(fresh, AdapterSpec.from_dir(spec.folder))
    after = reloaded.predict(texts)
    for b, a in zip(before, after):
        assert b.keys() == a.keys()
        for k in b:
            assert a[k] == pytest.approx(b[k], abs=1e-6)


def bb_task(bb, spec):
    from bot.tasks import task_class

    task = task_class("classify")(spec, bb)
    task.load_extra(spec.folder)
    return task


def test_crash_mid_training_leaves_previous_adapter_loadable(tmp_path, monkeypatch):
    bb = make_tiny_backbone()
    spec = toy_spec(tmp_path, epochs=1.0)
    train_adapter(spec, bb, spec.folder)
    before = sorted(p.name for p in spec.folder.iterdir())
    weights_before = (spec.folder / "adapter_model.safetensors").read_bytes()

    from bot.tasks import base

    calls = {"n": 0}
    real = base.optimise

    def crashing(*args, **kwargs):
        loss_fn = args[4]

        def boom(batch):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt  # Ctrl-C mid-training
            return loss_fn(batch)
        args = list(args)
        args[4] = boom
        return real(*args, **kwargs)

    monkeypatch.setattr("bot.tasks.classify_training.optimise", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(AdapterSpec.from_dir(spec.folder), bb, spec.folder)
    assert sorted(p.name for p in spec.folder.iterdir()) == before
    assert (spec.folder / "adapter_model.safetensors").read_bytes() == weights_before
    assert not [p for p in spec.folder.parent.iterdir() if ".tmp-" in p.name]
    tasks, failures = load_all(make_tiny_backbone(), spec.folder.parent)
    assert "pets" in tasks and not failures


def test_crash_while_saving_keeps_old_folder(tmp_path):
    bb = make_tiny_backbone()
    spec = toy_spec(tmp_path, epochs=1.0)
    train_adapter(spec, bb, spec.folder)
    old = (spec.folder / "head.safetensors").read_bytes()

    class Broken:
        def save_extra(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_adapter_folder(spec, bb, Broken(), {"x": 1}, spec.folder)
    assert (spec.folder / "head.safetensors").read_bytes() == old


def test_missing_head_is_a_clear_error(tmp_path):
    bb = make_tiny_backbone()
    spec = toy_spec(tmp_path, epochs=1.0)
    train_adapter(spec, bb, spec.folder)
    (spec.folder / "head.safetensors").unlink()
    tasks, failures = load_all(make_tiny_backbone(), spec.folder.parent)
    assert not tasks and "head.safetensors" in failures["pets"]


def test_generate_loss_covers_reply_tokens_only(tiny_backbone):
    from bot.tasks.generate import IGNORE, GenerateTask

    task = GenerateTask(AdapterSpec(name="talk", kind="generate", template=""), tiny_backbone)
    ids, labels = task.encode_pair("hi there", "hello!", 128)
    reply_ids = [t for t, y in zip(ids, labels) if y != IGNORE]
    text = tiny_backbone.tokenizer.decode(reply_ids)
    assert text == "hello!<|im_end|>"
    assert labels[0] == IGNORE


def test_generate_training_lowers_heldout_perplexity(tmp_path):
    bb = make_tiny_backbone()
    rows = [{"prompt": f"say {w}", "reply": f"{w} {w} {w}"} for w in ["red", "blue", "green", "gold"] * 6]
    path = tmp_path / "talk.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    spec = AdapterSpec.from_dict({"name": "talk", "kind": "generate", "template": "",
                                  "data": {"path": str(path)},
                                  "train": {"batch_size": 4, "learning_rate": 0.01, "max_length": 64}})
    torch.manual_seed(0)
    bb.add_adapter("talk", spec.lora.to_peft(2))
    from bot.tasks.generate import GenerateTask

    task = GenerateTask(spec, bb)
    task.fit(rows, 6.0, 0)
    result = task.evaluate(rows[:4])
    assert result["ppl_adapter"] < 0.8 * result["ppl_base"]


def test_eval_only_rescores_and_keeps_training_figures(tmp_path):
    from bot.training.train import reevaluate_adapter

    bb = make_tiny_backbone()
    spec = toy_spec(tmp_path, epochs=1.0)
    first = train_adapter(spec, bb, spec.folder, command="bot train pets")
    again = reevaluate_adapter(spec.folder, make_tiny_backbone(), eval_examples=5, command="bot train pets --eval-only")
    saved = json.loads((spec.folder / "metrics.json").read_text())
    assert saved["command"] == "bot train pets" and saved["train_seconds"] == first["train_seconds"]
    assert saved["eval_examples"] == 5 and saved["heldout"]["text"]["n"] == 5
    assert saved["eval_command"].endswith("--eval-only") and again["heldout"] == saved["heldout"]


def test_heldout_rows_are_shuffled_not_file_ordered():
    from bot.manifests.data import split

    rows = [{"text": f"good {i}", "label": "pos"} for i in range(300)]
    rows += [{"text": f"bad {i}", "label": "neg"} for i in range(300)]
    first = split(rows).test[:40]
    assert 10 < sum(r["label"] == "pos" for r in first) < 30
