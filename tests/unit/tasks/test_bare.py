"""The bare backbone as the ``assistant`` route (bot.tasks.bare, issue 11): ``kind: base``
manifests, the route that fits no other, and the server's ``model: assistant``.

Issue 11's distillation data is tested in tests/unit/training/test_distill.py, its
helpfulness report in tests/unit/eval/test_helpful.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REPO, ROUTES, WordHashEncoder, make_tiny_backbone

from bot.chat import ChatSession
from bot.errors import SpecError
from bot.manifests.registry import load_all
from bot.manifests.spec import AdapterSpec, LoraSettings
from bot.routing import Router
from bot.serve.state import ServerState, scheduler_for
from bot.tasks.generate import GenerateTask

ASSISTANT = ["what is the capital of france", "explain how a rainbow forms please"]


def base_manifest(folder: Path, name: str = "assistant") -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter.yaml").write_text(
        f"name: {name}\nkind: base\nroute_description: questions and requests\n"
        "route_examples:\n- what is the capital of france\n")
    return folder


def test_the_shipped_manifests_describe_their_routes():
    from bot.manifests.spec import discover

    specs = {s.name: s for s in discover(REPO / "adapters")}
    assert specs["assistant"].kind == "base" and specs["assistant"].route_data == {"bundled": "trec_questions"}
    assert all(s.route_description for s in specs.values())
    readme = (REPO / "docs" / "routing.md").read_text(encoding="utf-8")
    for name in specs:
        assert f"| `{name}` |" in readme  # the routing guide's table of routes


def test_a_base_manifest_loads_without_weights_and_refuses_training(tmp_path):
    base_manifest(tmp_path / "assistant")
    backbone = make_tiny_backbone()
    tasks, failures = load_all(backbone, tmp_path)
    assert failures == {} and tasks["assistant"].kind == "base"
    assert tasks["assistant"].adapter_name is None and backbone.adapters == []
    with pytest.raises(SpecError, match="nothing to train"):
        tasks["assistant"].fit([{"prompt": "a", "reply": "b"}], 1, 0)


def test_a_bad_kind_is_still_refused(tmp_path):
    with pytest.raises(SpecError, match="kind"):
        AdapterSpec.from_dict({"name": "x", "kind": "bare"})


def make_session() -> ChatSession:
    backbone = make_tiny_backbone()
    lora = LoraSettings(r=2, target_modules=["q_proj", "v_proj"])
    chat = AdapterSpec(name="chat", kind="generate", template="", lora=lora, route_examples=ROUTES["chat"])
    backbone.add_adapter("chat", lora.to_peft(backbone.base.config.num_hidden_layers))
    from bot.tasks.bare import BaseTask

    tasks = {"chat": GenerateTask(chat, backbone),
             "assistant": BaseTask(AdapterSpec(name="assistant", kind="base", template=""), backbone)}
    router = Router(WordHashEncoder(), fallback="assistant")
    router.add_route("chat", ROUTES["chat"])
    router.add_route("assistant", ASSISTANT)
    return ChatSession(backbone, tasks, router, max_new_tokens=3)


def test_the_assistant_route_generates_with_no_adapter(monkeypatch):
    session = make_session()
    used = []
    real = session.scheduler.stream
    monkeypatch.setattr(session.scheduler, "stream",
                        lambda ids, adapter, params: used.append(adapter) or real(ids, adapter, params))
    turn = session.send("/assistant what is the capital of france")
    assert turn.adapter == "assistant"  # (a random tiny model may say nothing)
    turn = session.fork().send("hi how are you today")
    assert turn.adapter == "chat"
    assert used == [None, "chat"]


def test_a_turn_that_fits_no_route_goes_to_the_assistant_with_the_reason():
    session = make_session()
    session.router.threshold = 0.5
    choice = session.router.route("zebra xylophone quantum")
    assert choice.adapter == "assistant" and choice.fallback
    assert choice.reason.startswith("no route fits") and "fallback 'assistant'" in choice.reason


def test_the_server_answers_model_assistant_with_the_bare_backbone():
    session = make_session()
    state = ServerState(session.backbone, session.tasks, scheduler_for(session.backbone, session.tasks),
                        session.router)
    assert "assistant" in state.model_ids()
    assert {"id": "assistant", "kind": "base"}.items() <= next(c for c in state.model_cards() if c["id"] == "assistant").items()
    assert state.plan_chat("assistant", [{"role": "user", "content": "hi"}]).adapter is None
    plan = state.plan_chat("auto", [{"role": "user", "content": "what is the capital of france"}])
    assert plan.adapter is None and plan.route.adapter == "assistant"
    assert state.plan_chat("chat", [{"role": "user", "content": "hi"}]).adapter == "chat"
    state.scheduler.close()


# ------------------------------------------------------------ self-distillation data


# ------------------------------------------------------------ the report
