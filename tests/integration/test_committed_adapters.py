"""Real embedded backbone and the committed adapters (marked `integration`; `make test` runs them)."""

from __future__ import annotations

import json

import pytest
import torch

from bot.manifests.spec import AdapterSpec
from bot.training.train import CHECK_N, training_rows
from bot.util.assets import repo_root

pytestmark = pytest.mark.integration
ADAPTERS = repo_root() / "adapters"


@pytest.fixture(scope="module")
def real_backbone():
    from bot.model.backbone import Backbone

    torch.set_num_threads(2)
    return Backbone.load()


def test_embedded_backbone_generates_a_sensible_reply(real_backbone):
    from bot.tasks.generate import GenerateTask

    bb = real_backbone
    assert bb.info.name == "SmolLM2-135M-Instruct"
    assert 130e6 < bb.num_parameters < 140e6
    task = GenerateTask(AdapterSpec(name="plain", kind="generate", template=""), bb)
    reply = task.generate("What is the capital of France?", adapter=None, max_new_tokens=24)
    assert "paris" in reply.lower(), reply


def _committed(kind: str | None = None):
    out = []
    for folder in sorted(ADAPTERS.glob("*/adapter_model.safetensors")):
        spec = AdapterSpec.from_dir(folder.parent)
        if kind is None or spec.kind == kind:
            out.append(spec.name)
    return out


def test_default_adapters_are_committed():
    assert {"topic", "sentiment", "chat"} <= set(_committed())


def _committed_check(backbone, name: str):
    """(task loaded on the real backbone, recorded first-100 figures, those 100 held-out rows)."""
    from bot.manifests.registry import load_task

    spec = AdapterSpec.from_dir(ADAPTERS / name)
    recorded = json.loads((ADAPTERS / name / "metrics.json").read_text())[f"heldout_first_{CHECK_N}"]
    _, splits = training_rows(spec)
    return load_task(backbone, spec), recorded, splits.test[:CHECK_N]


@pytest.mark.parametrize("name", _committed("classify"))
def test_committed_classifier_matches_its_metrics(real_backbone, name):
    task, recorded, rows = _committed_check(real_backbone, name)
    measured = task.evaluate(rows)
    for view, want in recorded.items():
        got = measured[view]["accuracy"]
        # bf16 autocast kernels differ slightly between machines: allow 3 of 100 to flip
        assert abs(got - want["accuracy"]) <= 0.03, f"{name}/{view}: {got} vs recorded {want['accuracy']}"
        assert got > 0.6


@pytest.mark.parametrize("name", _committed("generate"))
def test_committed_generator_matches_its_metrics(real_backbone, name):
    task, recorded, rows = _committed_check(real_backbone, name)
    got = task.perplexity(rows)
    assert got == pytest.approx(recorded["ppl_adapter"], rel=0.03)
    assert got < recorded["ppl_base"]


def test_mixed_analysis_matches_single_runs_on_real_adapters(real_backbone):
    from bot.engine.scheduler import classify_now
    from bot.manifests.registry import load_all
    from bot.tasks.classify import ClassifyTask

    tasks, failures = load_all(real_backbone, ADAPTERS)
    classifiers = [t for t in tasks.values() if isinstance(t, ClassifyTask)]
    assert len(classifiers) >= 2, failures
    text = "The match was a disaster for the home fans."
    # the engine's mixed-adapter pass: one row per classifier, each with its own adapter
    names = [t.name for t in classifiers]
    probs = classify_now(real_backbone, {t.name: t for t in classifiers}, [text] * len(names), names,
                         max_length=128)
    mixed = dict(zip(names, probs))
    for task in classifiers:
        alone = task.predict([text])[0]
        for label, p in alone.items():
            assert mixed[task.name][label] == pytest.approx(p, abs=0.02)


def test_committed_router_second_stage_matches_its_metrics_and_attaches(real_backbone):
    from bot.manifests.registry import load_task
    from bot.manifests.router_folder import NAME, folder_of
    from bot.manifests.spec import discover
    from bot.routing import build_router
    from bot.routing.second import attach, plain

    folder = folder_of(ADAPTERS)
    spec = AdapterSpec.from_dir(folder)
    recorded = json.loads((folder / "metrics.json").read_text())[f"heldout_first_{CHECK_N}"]
    _, splits = training_rows(spec)
    rows = splits.test[:CHECK_N]
    assert all(plain(r["text"]) == r["text"] for r in rows)  # trained on what it reads when routing
    task = load_task(real_backbone, spec)
    got = task.evaluate(rows)["text"]["accuracy"]
    real_backbone.drop_adapter(NAME)
    assert abs(got - recorded["text"]["accuracy"]) <= 0.03 and got > 0.9
    # attached as the demo attaches it: for exactly these routes, with the fitted gate
    router = build_router(discover(ADAPTERS))
    stage = json.loads((folder / "stage.json").read_text())
    try:
        second = attach(router, real_backbone, ADAPTERS)
        assert second is not None and second.gate == stage["gate"] > 0
        assert sorted(second.labels) == sorted(router.routes) == sorted(stage["routes"])
        unsure = {name: 1 / len(router.routes) for name in router.routes}
        mixed, why = second.consult(unsure, "Who was the first person to walk on the Moon?")
        assert "route adapter" in why and max(mixed, key=mixed.get) == "assistant"
    finally:
        if NAME in real_backbone.adapters:
            real_backbone.drop_adapter(NAME)
