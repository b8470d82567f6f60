"""Data-parallel training through accelerate and gradient accumulation give the same adapter
as one process with the same effective batch (2 CPU processes over gloo, tiny model)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, make_tiny_backbone, make_tiny_model, make_tokenizer
from safetensors.torch import load_file

from bot.cli import main
from bot.manifests.spec import AdapterSpec
from bot.tasks.generate import GenerateTask
from bot.training.parallel import Parallel

ROOT = REPO
WORDS = {"cat": ["meow", "purr"], "dog": ["woof", "bark"]}


def pets_folder(root: Path) -> Path:
    """An adapter folder with dropout 0, so every process computes the same function."""
    rng = random.Random(0)
    lines = ["text,label"]
    for i in range(80):
        label = rng.choice(sorted(WORDS))
        lines.append(f"number {i} is a {rng.choice(WORDS[label])},{label}")
    (root / "pets.csv").write_text("\n".join(lines) + "\n")
    folder = root / "adapters" / "pets"
    AdapterSpec.from_dict({
        "name": "pets", "kind": "classify", "labels": ["cat", "dog"],
        "data": {"path": str(root / "pets.csv")}, "lora": {"r": 4, "dropout": 0.0},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 0.003, "head_lr": 0.03,
                  "max_length": 32}}, folder / "adapter.yaml").save(folder)
    return folder


def max_diff(a: Path, b: Path, name: str) -> float:
    x, y = load_file(str(a / name)), load_file(str(b / name))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("BOT_COMPUTE", "fp32")
    backbone = tmp_path / "backbone"
    make_tiny_model().save_pretrained(backbone)
    make_tokenizer().save_pretrained(backbone)
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        root.mkdir()
        pets_folder(root)
    args = ["train", "pets", "--backbone", str(backbone), "--device", "cpu"]
    assert main([*args, "--adapters-dir", str(one / "adapters")]) == 0
    env = {**os.environ, "BOT_COMPUTE": "fp32", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "bot.cli", *args, "--adapters-dir",
                          str(two / "adapters"), "--accelerate", "--processes", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved ") == 1  # only the main process evaluates and saves
    a, b = one / "adapters" / "pets", two / "adapters" / "pets"
    metrics = json.loads((b / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert metrics["steps"] == json.loads((a / "metrics.json").read_text())["steps"]
    assert max_diff(a, b, "adapter_model.safetensors") < 1e-5
    assert max_diff(a, b, "head.safetensors") < 1e-5
    assert not list((two / "adapters").glob(".*tmp*"))  # no half-written folder left


def lora_state(bb, name: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in bb.peft.named_parameters() if f".{name}." in n}


@pytest.mark.parametrize("accum", [2, 3])
def test_gradient_accumulation_matches_one_big_batch(accum):
    """Reply-token weighting keeps the generation loss exact across micro-batches."""
    rows = [{"prompt": f"say {w}", "reply": f"{w} " * (1 + i % 3)}
            for i, w in enumerate(["red", "blue", "green", "gold", "teal"] * 3)]
    spec = AdapterSpec.from_dict({"name": "talk", "kind": "generate", "template": "",
                                  "lora": {"r": 4, "dropout": 0.0},
                                  "train": {"batch_size": 6, "learning_rate": 0.01, "max_length": 48}})
    states = []
    for parallel in (None, Parallel(None, grad_accum=accum)):
        bb = make_tiny_backbone()
        torch.manual_seed(0)
        bb.add_adapter("talk", spec.lora.to_peft(model=bb.base))
        GenerateTask(spec, bb).fit(rows, 2.0, 0, parallel=parallel)
        states.append(lora_state(bb, "talk"))
    for k in states[0]:
        assert torch.allclose(states[0][k], states[1][k], atol=1e-5), k
    assert any(float(v.abs().max()) > 0 for k, v in states[0].items() if "lora_B" in k)


class FakeAccelerator:
    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world


@pytest.mark.parametrize("world,accum,size", [(2, 1, 8), (2, 2, 7), (3, 2, 2), (4, 1, 3)])
def test_micro_batch_weights_add_up_to_the_global_mean(world, accum, size):
    batch = list(range(1, size + 1))
    weight = float  # item i weighs i (like a reply of i tokens)
    seen, total = [], 0.0
    for rank in range(world):
        for piece, share in Parallel(FakeAccelerator(rank, world), accum).micro_batches(batch, weight):
            if share:
                seen += piece
            # DDP averages over processes: each process's shares sum to world * its part
            total += share / world
    assert sorted(seen) == batch and total == pytest.approx(1.0)


def test_gradient_accumulation_matches_on_the_cached_classify_path(tmp_path):
    """LoRA on the top layer only: training runs from cached lower-layer states (bot.tasks.frozen)."""
    from bot.tasks.classify import ClassifyTask

    folder = pets_folder(tmp_path)
    spec = AdapterSpec.from_dir(folder)
    spec.lora.layers = [-1]
    rows = [{"text": f"number {i} is a {w}", "label": "cat" if w in WORDS["cat"] else "dog"}
            for i, w in enumerate(["meow", "woof", "purr", "bark"] * 5)]
    states, paths = [], []
    for parallel in (None, Parallel(None, grad_accum=2)):
        bb = make_tiny_backbone()
        torch.manual_seed(0)
        bb.add_adapter("pets", spec.lora.to_peft(model=bb.base))
        task = ClassifyTask(spec, bb)
        paths.append(task.fit(rows, 1.0, 0, parallel=parallel)["path"])
        states.append({**lora_state(bb, "pets"), "head": task.head.weight.detach().clone()})
    assert paths == ["cached", "cached"]
    for k in states[0]:
        assert torch.allclose(states[0][k], states[1][k], atol=1e-5), k
