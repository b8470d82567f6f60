"""Demo logic without the real model: a tiny random backbone and a hashing router."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest
from helpers import ROUTES, WordHashEncoder, make_tiny_backbone

from bot.chat import ChatSession, Turn
from bot.manifests.spec import AdapterSpec, LoraSettings
from bot.routing import RouteChoice, Router
from bot.tasks.classify import ClassifyTask
from bot.tasks.generate import GenerateTask
from demo import app as demo_app


def make_session(folder: Path | None = None, max_chars: int = 200) -> ChatSession:
    """A ChatSession over a tiny backbone with one classify and one generate adapter."""
    backbone = make_tiny_backbone()
    lora = LoraSettings(r=2, target_modules=["q_proj", "v_proj"])
    specs = [AdapterSpec(name="sentiment", kind="classify", labels=["negative", "positive"],
                         template="Review: {text}\nSentiment:", lora=lora, folder=folder,
                         description="tiny sentiment", route_examples=ROUTES["sentiment"]),
             AdapterSpec(name="chat", kind="generate", template="", lora=lora,
                         description="tiny chat", route_examples=ROUTES["chat"])]
    tasks = {}
    for spec in specs:
        backbone.add_adapter(spec.name, spec.lora.to_peft(backbone.base.config.num_hidden_layers))
        tasks[spec.name] = (ClassifyTask if spec.kind == "classify" else GenerateTask)(spec, backbone)
    router = Router(WordHashEncoder())
    for name, examples in ROUTES.items():
        router.add_route(name, examples)
    return ChatSession(backbone, tasks, router, max_chars=max_chars, max_new_tokens=3)


@pytest.fixture(scope="module")
def session():
    return make_session()


def run(session, text, conv=None, force="auto"):
    """Drive the chat handler to the end; return (all yields, last yield)."""
    steps = list(demo_app.respond(session, text, force, conv))
    return steps, steps[-1]


def routed_turn(**route) -> Turn:
    choice = dict(adapter="sentiment", score=0.91, runner_up="topic", runner_up_score=0.22,
                  scores={"sentiment": 0.91, "topic": 0.22}, reason="best match 'sentiment'")
    choice.update(route)
    return Turn(user="x", reply="Sounds **negative** (0.93).", adapter="sentiment",
                route=RouteChoice(**choice), label_scores={"negative": 0.93, "positive": 0.07},
                analysis={"sentiment": {"negative": 0.93, "positive": 0.07},
                          "topic": {"tech": 0.64, "sport": 0.36}},
                timings={"route_ms": 10.0, "analysis_ms": 50.0, "total_ms": 143.2})


# ------------------------------------------------------------------ formatting
def test_format_meta_names_adapter_score_runner_up_latency_and_chips():
    line = demo_app.format_meta(routed_turn())
    assert line == ("⚙ adapter: sentiment (0.91) · runner-up: topic 0.22 · 143 ms · "
                    "sentiment: negative 0.93 · topic: tech 0.64")


def test_format_meta_marks_forced_and_fallback_turns():
    assert "adapter: sentiment (forced)" in demo_app.format_meta(routed_turn(override=True, runner_up=None))
    assert "(fallback, 0.91)" in demo_app.format_meta(routed_turn(fallback=True))
    assert demo_app.format_meta(Turn("", "", None, notice="Type a message to start.")) == ""


def test_turn_panel_exposes_the_adapter_in_a_data_attribute():
    html = demo_app.turn_panel(routed_turn(), 3)
    assert 'data-adapter="sentiment"' in html and 'data-turn="3"' in html


# ------------------------------------------------------------------ the app
def test_build_app_returns_blocks(session):
    session.failures = {"topic": "not trained yet: run `bot train topic`"}
    try:
        app = demo_app.build_app(session)
    finally:
        session.failures = {}
    assert isinstance(app, gr.Blocks)
    dropdown = next(b for b in app.blocks.values() if isinstance(b, gr.Dropdown))
    assert [c[0] for c in dropdown.choices] == ["auto", "sentiment", "chat"]


def test_classify_turn_shows_metadata_and_panel(session):
    _, (messages, panel, conv, textbox) = run(session, "I loved this blender, it is great")
    user, meta, reply = messages
    assert user == {"role": "user", "content": "I loved this blender, it is great"}
    assert meta["metadata"]["title"].startswith("⚙ adapter: sentiment (")
    assert "runner-up: chat" in meta["metadata"]["title"]
    assert reply["content"].startswith("**")  # the default reply template
    assert 'data-adapter="sentiment"' in panel and textbox == ""


def test_generated_reply_is_streamed(session):
    steps, (messages, panel, _, _) = run(session, "hi how are you today")
    assert len(steps) >= 3  # placeholder, at least one partial, the finished turn
    assert steps[0][0][1]["metadata"]["status"] == "pending"
    assert messages[1]["metadata"]["title"].startswith("⚙ adapter: chat (")
    assert messages[2]["content"]
    assert 'data-adapter="chat"' in panel


def test_forced_adapter_is_used(session):
    _, (messages, panel, _, _) = run(session, "hi how are you today", force="sentiment")
    assert "adapter: sentiment (forced)" in messages[1]["metadata"]["title"]
    assert 'data-adapter="sentiment"' in panel


def test_two_browser_sessions_do_not_share_history(session):
    _, (_, _, alice, _) = run(session, "I loved this blender, it is great")
    _, (_, _, bob, _) = run(session, "terrible product, awful waste of money")
    _, (_, _, alice, _) = run(session, "tell me a joke please", conv=alice)
    assert alice.session is not bob.session and alice.session is not session
    assert [m["content"] for m in alice.session.history if m["role"] == "user"] == [
        "I loved this blender, it is great", "tell me a joke please"]
    assert [m["content"] for m in bob.session.history if m["role"] == "user"] == [
        "terrible product, awful waste of money"]
    assert len(bob.messages) == 3 and len(alice.messages) == 6
    assert session.history == []  # the shared base session is never written to


def test_empty_message_makes_no_model_call(session, monkeypatch):
    def boom(*_, **__):
        raise AssertionError("the model or router was called for an empty message")

    monkeypatch.setattr(session.backbone, "forward", boom)
    monkeypatch.setattr(session.router, "route", boom)
    monkeypatch.setattr(session, "fork", boom)
    steps, (messages, panel, conv, _) = run(session, "   \n ")
    assert len(steps) == 1 and messages == [] and conv is None
    assert demo_app.EMPTY_NOTICE in panel


def test_long_message_is_cut_with_a_visible_notice():
    small = make_session(max_chars=40)
    text = "I loved this blender it is great " * 5
    _, (messages, panel, _, _) = run(small, text)
    assert len(messages[0]["content"]) <= 42
    assert "cut to 40" in messages[2]["content"] and "cut to 40" in panel


def test_a_failing_model_is_reported_in_the_chat(session, monkeypatch):
    def broken(*_, **__):
        raise RuntimeError("backbone exploded")

    monkeypatch.setattr(session.backbone, "forward", broken)
    _, (messages, panel, _, _) = run(session, "I loved this blender, it is great")
    assert "backbone exploded" in messages[2]["content"]
    assert messages[1]["metadata"]["status"] == "done" and 'data-adapter="error"' in panel


# ------------------------------------------------------------------ adapters tab
def test_adapter_cards_show_metrics_and_failures(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({
        "heldout": {"text": {"n": 200, "accuracy": 0.875, "macro_f1": 0.86, "confusion": [[1]]}},
        "split_sizes": {"train": 1600, "val": 200, "test": 200}, "examples_seen": 1600,
        "epochs": 1, "train_seconds": 312.4}))
    sess = make_session(folder=tmp_path)
    sess.failures = {"topic": "head.safetensors is missing"}
    cards = demo_app.adapter_cards(sess)
    assert "### sentiment" in cards and "tiny sentiment" in cards and "negative, positive" in cards
    assert "train 1600 · val 200 · test 200" in cards and "1600 examples seen" in cards
    assert "| text | 200 | 87.5% | 86.0% |" in cards and "confusion" not in cards
    assert "### topic (not loaded)" in cards and "head.safetensors is missing" in cards
    assert "metrics.json missing" in cards  # chat has no folder


def test_generate_metrics_render_as_one_row():
    lines = demo_app.heldout_table({"n": 50, "ppl_base": 20.0, "ppl_adapter": 15.0, "ppl_change": -0.25})
    assert lines[-1] == "| test | 50 | 20.00 | 15.00 | -25.0% |"


# ------------------------------------------------------------------ evaluation tab
def test_eval_view_without_report_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_app, "REPORTS", tmp_path / "reports")
    text, figures = demo_app.eval_view()
    assert "run `bot eval`" in text and figures == []


def test_eval_view_reads_only_pngs_inside_reports(tmp_path, monkeypatch):
    from PIL import Image

    reports = tmp_path / "reports"
    reports.mkdir()
    Image.new("RGB", (4, 4)).save(reports / "summary.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    (reports / "eval.md").write_text("# Eval\n![accuracy per task](summary.png)\n"
                                     "![escape](../secret.png)\n![gone](missing.png)\n")
    monkeypatch.setattr(demo_app, "REPORTS", reports)
    text, figures = demo_app.eval_view()
    assert [caption for _, caption in figures] == ["accuracy per task"]
    assert "figure ../secret.png not found" in text and "figure missing.png not found" in text


def test_demo_command_defaults_to_localhost_without_share():
    from bot.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert args.host == "127.0.0.1" and args.share is False
