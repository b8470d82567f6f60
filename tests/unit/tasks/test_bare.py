"""Issue 11: the bare backbone as the ``assistant`` route, self-distillation data, helpfulness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, ROUTES, WordHashEncoder, make_tiny_backbone

from bot.chat import ChatSession
from bot.errors import SpecError
from bot.eval.helpful import met
from bot.eval.report import write_report
from bot.manifests.registry import load_all
from bot.manifests.spec import AdapterSpec, LoraSettings
from bot.routing import Router
from bot.serve.state import ServerState, scheduler_for
from bot.tasks.generate import GenerateTask
from bot.training.distill import whole_sentences
from bot.training.train import data_files, training_rows

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
def test_train_extra_rows_join_training_only_and_survive_a_save(tmp_path):
    folder = tmp_path / "talk"
    folder.mkdir()
    rows = [{"prompt": f"question {i}?", "reply": f"answer {i}."} for i in range(40)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = [{"prompt": "why?", "reply": "Because. It is so."}] * 3
    (folder / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in extra))
    (folder / "extra.meta.json").write_text("{}")
    spec = AdapterSpec(name="talk", kind="generate", folder=folder,
                       data={"path": "data.jsonl", "train_extra": ["extra.jsonl"]})
    _, splits = training_rows(spec)
    assert sum(r["prompt"] == "why?" for r in splits.train) == 3
    assert all(r["prompt"] != "why?" for r in splits.val + splits.test)
    assert {p.name for p in data_files(spec, folder)} == {"data.jsonl", "extra.jsonl", "extra.meta.json"}
    with pytest.raises(SpecError, match="train_extra"):
        AdapterSpec(name="talk", kind="generate", data={"path": "d.jsonl", "train_extra": "x.jsonl"})


def test_a_cut_reply_keeps_whole_sentences_only():
    assert whole_sentences("One. Two! Three is cut mid") == "One. Two!"
    assert whole_sentences("no end at all") == ""
    assert whole_sentences("Say \"hi.\" Then go") == "Say \"hi.\""


def test_the_committed_distillation_file_is_not_the_held_out_set():
    rows = [json.loads(line) for line in (REPO / "adapters/chat/self_distill.jsonl").open()]
    held = {json.loads(line)["prompt"].lower() for line in (REPO / "tests/data/instructions.jsonl").open()}
    assert len(rows) >= 400 and all(r["reply"] for r in rows)
    assert not {r["prompt"].lower() for r in rows} & held
    meta = json.loads((REPO / "adapters/chat/self_distill.meta.json").read_text())
    assert meta["command"].startswith("bot distill") and meta["rows"] == len(rows)


def test_instructions_file_is_well_formed():
    rows = [json.loads(line) for line in (REPO / "tests/data/instructions.jsonl").open()]
    assert len(rows) >= 40 and len({r["prompt"] for r in rows}) == len(rows)
    assert {r["kind"] for r in rows} == {"question", "request"}
    assert all(len(r["reply"].split(". ")) >= 2 for r in rows if "\n" not in r["reply"])


# ------------------------------------------------------------ the report
def test_helpfulness_targets_and_report_section(tmp_path):
    figures = {"ppl_ratio": 1.05, "length_ratio": 0.5, "dialogue_ppl_change": -0.3}
    assert met(figures) == {"ppl_ratio": True, "length_ratio": False, "dialogue_ppl_change": True}
    assert met({})["ppl_ratio"] is None
    ins = {**figures, "n": 1, "ppl_base": 10.0, "ppl_adapter": 10.5, "length_base": 40,
           "length_adapter": 20, "max_tokens": 160, "routed_to": {"assistant": 1}, "met": met(figures),
           "samples": [{"prompt": "How?", "base": "Like so. Then.", "adapter": "So.",
                        "route": "assistant", "routed": "Like so. Then."}]}
    results = {"tasks": {"chat": {"kind": "generate", "status": "ok", "ppl_base": 50.0, "ppl_adapter": 30.0,
                                  "instructions": ins},
                         "assistant": {"kind": "base", "status": "ok", "verdict": "bare backbone"}}}
    _, md = write_report(results, tmp_path, plots=False)
    text = md.read_text()
    assert "| assistant | bare backbone |" in text
    assert "NOT MET" in text and "**assistant**: Like so. Then." in text
