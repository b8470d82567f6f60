"""Gradio demo: one chat routed over the adapters, an Adapters tab and an Evaluation tab.

Each browser session gets its own ChatSession (``base.fork()``), made on its first message
and kept in ``gr.State``: the models are shared, a conversation's history never is.
Only files inside the repository's ``reports/`` folder are read for display, and their
names come from ``reports/eval.md``, never from the browser.
"""

from __future__ import annotations

import html
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

REPO = Path(__file__).resolve().parent.parent
REPORTS = REPO / "reports"
EVAL_MD = "eval.md"
EMPTY_NOTICE = "Type a message to start."
NO_REPORT = "No evaluation report yet: run `bot eval` to create the report."
# Replies decode in the shared scheduler's batches (bot.serve), so up to CONCURRENCY browser
# tabs are answered together; beyond QUEUE_SIZE, Gradio refuses at once with a message.
CONCURRENCY = 16
QUEUE_SIZE = 64
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
log = logging.getLogger(__name__)

# Local font stacks only: the demo must not fetch web fonts (it often runs offline).
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "monospace"])
CSS = """
#last-turn .turn-info { padding: 8px 12px; border-radius: 8px; font-size: 0.9em;
  background: var(--block-background-fill); border: 1px solid var(--border-color-primary); }
#last-turn .turn-info code { font-weight: 600; }
"""


# ------------------------------------------------------------------ one turn, shown
def format_meta(turn) -> str:
    """One line: ``⚙ adapter: sentiment (0.91) · runner-up: topic 0.22 · 143 ms · chips``."""
    route = turn.route
    if route is None:
        return ""
    how = "forced" if route.override else f"{route.score:.2f}"
    if route.fallback:
        how = f"fallback, {how}"
    parts = [f"⚙ unsure ({route.adapter} {route.score:.2f}): asked which adapter" if turn.abstained
             else f"⚙ adapter: {turn.adapter or 'none'} ({how})"]
    if route.runner_up:
        parts.append(f"runner-up: {route.runner_up} {route.runner_up_score:.2f}")
    parts.append(f"{turn.timings.get('total_ms', 0.0):.0f} ms")
    if turn.chips():
        parts.append(turn.chips())
    return " · ".join(parts)


def _ranked(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(scores.items(), key=lambda kv: -kv[1]))


def turn_details(turn) -> str:
    """Markdown for the metadata box: why this adapter, all scores, timings."""
    route = turn.route
    lines = [f"**Why:** {route.reason}"]
    if route.adapter != turn.adapter and not turn.abstained:
        instead = f"`{turn.adapter}` answered instead" if turn.adapter else "no adapter could answer"
        lines.append(f"The router chose `{route.adapter}`, which is not loaded; {instead}.")
    if route.scores:
        lines.append(f"**Router scores:** {_ranked(route.scores)}")
    if turn.label_scores:
        lines.append(f"**Labels:** {_ranked(turn.label_scores)}")
    names = ("route_ms", "analysis_ms", "first_token_ms", "total_ms")
    timing = [f"{n[:-3].replace('_', ' ')} {turn.timings[n]:.0f} ms" for n in names if n in turn.timings]
    lines.append("**Timings:** " + " · ".join(timing))
    return "\n\n".join(lines)


def panel_html(adapter: str, turn_no: int, text: str, score: str = "") -> str:
    """The "last turn" panel; ``data-adapter`` makes the choice easy to read from the DOM."""
    return (f'<div class="turn-info" data-adapter="{html.escape(adapter)}" data-turn="{turn_no}" '
            f'data-score="{html.escape(score)}">{text}</div>')


def turn_panel(turn, turn_no: int) -> str:
    """Panel for a finished turn."""
    score = "" if turn.route is None else f"{turn.route.score:.2f}"
    body = f"<b>Turn {turn_no}</b> · {html.escape(format_meta(turn))}"
    if turn.notice:
        body += f"<br>⚠ {html.escape(turn.notice)}"
    return panel_html(turn.adapter or "none", turn_no, body, score)


@dataclass
class Conversation:
    """One browser session's chat: its own ChatSession and the messages on screen."""

    session: object
    messages: list[dict] = field(default_factory=list)
    turns: int = 0


def _reply_text(turn) -> str:
    reply = turn.reply or "(the model returned an empty reply)"
    return f"{reply}\n\n*⚠ {turn.notice}*" if turn.notice else reply


def _shown_user_text(text: str, max_chars: int) -> str:
    # Echo what the model will see, so a huge paste does not flood the page.
    return text if len(text) <= max_chars else text[:max_chars] + " …"


def respond(base, message: str, force: str | None, conv: Conversation | None,
            abstain: bool | None = None):
    """Stream one turn; yields (chat messages, panel html, conversation, textbox value).

    Args:
        abstain: ask which adapter was meant when the router is unsure (None: its default).
    """
    text = (message or "").strip()
    if not text:  # nothing to answer: no router or model call at all
        yield (list(conv.messages) if conv else []), panel_html("", conv.turns if conv else 0,
                                                                 EMPTY_NOTICE), conv, ""
        return
    conv = conv or Conversation(base.fork())
    session = conv.session
    force = force if force in session.tasks else None
    conv.messages += [{"role": "user", "content": _shown_user_text(text, session.max_chars)},
                      {"role": "assistant", "content": "",
                       "metadata": {"title": "⚙ routing…", "status": "pending"}},
                      {"role": "assistant", "content": ""}]
    yield list(conv.messages), panel_html("", conv.turns, "Thinking…"), conv, ""
    turn = None
    try:
        for partial, turn in session.stream(text, force, abstain):
            if turn is None:
                conv.messages[-1] = {"role": "assistant", "content": partial}
                yield list(conv.messages), gr.skip(), conv, gr.skip()
    except Exception as err:  # show it in the chat rather than leave a pending bubble
        log.exception("a chat turn failed")
        yield _failed(conv, err)
        return
    yield _finished(conv, turn) if turn else _failed(conv, RuntimeError("no reply was produced"))


def _finished(conv: Conversation, turn):
    conv.turns += 1
    conv.messages[-2] = {"role": "assistant", "content": turn_details(turn),
                         "metadata": {"title": format_meta(turn), "status": "done"}}
    conv.messages[-1] = {"role": "assistant", "content": _reply_text(turn)}
    return list(conv.messages), turn_panel(turn, conv.turns), conv, ""


def _failed(conv: Conversation, err: Exception):
    conv.turns += 1
    conv.messages[-2] = {"role": "assistant", "content": f"`{type(err).__name__}`",
                         "metadata": {"title": "⚠ error", "status": "done"}}
    conv.messages[-1] = {"role": "assistant", "content": f"Sorry, that failed: {err}"}
    return list(conv.messages), panel_html("error", conv.turns, html.escape(str(err))), conv, ""


# ------------------------------------------------------------------ adapters tab
def read_metrics(folder) -> dict:
    """``metrics.json`` of an adapter folder, or {} when missing or unreadable."""
    try:
        return json.loads((Path(folder) / "metrics.json").read_text(encoding="utf-8"))
    except (TypeError, OSError, ValueError):
        return {}


def _fmt(key: str, value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if "change" in key:
            return f"{value:+.1%}"
        if "accuracy" in key or "f1" in key:
            return f"{value:.1%}"
        return f"{value:.2f}"
    return str(value)


def heldout_table(heldout) -> list[str]:
    """Markdown table of the scalar held-out metrics (one row per view for classifiers)."""
    if not heldout:
        return ["_no held-out metrics (metrics.json missing)_"]
    rows = heldout if all(isinstance(v, dict) for v in heldout.values()) else {"": heldout}
    first = next(iter(rows.values()))
    keys = [k for k, v in first.items() if not isinstance(v, (dict, list))]  # skip confusion etc.
    lines = ["| view | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for view, values in rows.items():
        lines.append(f"| {view or 'test'} | " + " | ".join(_fmt(k, values.get(k)) for k in keys) + " |")
    return lines


def data_size(metrics: dict) -> str:
    """e.g. ``train 1780 · val 222 · test 223; 1780 examples seen (1 epoch, 312 s)``."""
    sizes = metrics.get("split_sizes")
    if not sizes:
        return "unknown (no metrics.json yet)"
    text = " · ".join(f"{k} {v}" for k, v in sizes.items())
    if "examples_seen" in metrics:
        text += f"; {metrics['examples_seen']} examples seen"
        extra = [f"{metrics[k]:g} epoch(s)" if k == "epochs" else f"{metrics[k]:.0f} s"
                 for k in ("epochs", "train_seconds") if isinstance(metrics.get(k), (int, float))]
        text += f" ({', '.join(extra)})" if extra else ""
    return text


def adapter_card(task) -> str:
    """Markdown for one loaded adapter."""
    spec = task.spec
    metrics = read_metrics(spec.folder) if spec.folder else {}
    lines = [f"### {spec.name}", spec.description or "_no description_", "",
             f"- **kind:** {spec.kind}"]
    if spec.labels:
        lines.append(f"- **labels:** {', '.join(spec.labels)}")
    if spec.route_description:
        lines.append(f"- **the router sends here:** {spec.route_description}")
    if spec.kind == "base":
        return "\n".join(lines + ["- **weights:** none: the bare backbone answers (nothing to train)"])
    lines += [f"- **training data:** {data_size(metrics)}", "", "**Held-out metrics**", ""]
    return "\n".join(lines + heldout_table(metrics.get("heldout")))


def adapter_cards(session) -> str:
    """The Adapters tab: loaded adapters, then the ones that failed with their error."""
    cards = [adapter_card(task) for task in session.tasks.values()]
    cards += [f"### {name} (not loaded)\n⚠ {err}" for name, err in session.failures.items()]
    return "\n\n---\n\n".join(cards) or "No adapters found. Add one with `bot add`."


# ------------------------------------------------------------------ evaluation tab
def report_file(name: str) -> Path | None:
    """``reports/<name>`` if it is a file inside reports/ (no ``..`` or links out), else None."""
    root = REPORTS.resolve()
    try:
        path = (root / name).resolve()
    except (OSError, ValueError):
        return None
    return path if path.is_relative_to(root) and path.is_file() else None


def _load_png(path: Path):
    # Hand gradio pixels, not a path: it then serves its own cached copy and the
    # reports folder never has to be opened to the browser (no allowed_paths).
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def eval_view() -> tuple[str, list]:
    """(markdown of reports/eval.md, [(image, caption)] of the PNGs it references)."""
    md = report_file(EVAL_MD)
    if md is None:
        return NO_REPORT, []
    figures = []

    def swap(match):
        caption, name = match.group(1) or match.group(2), match.group(2)
        png = report_file(name) if name.lower().endswith(".png") else None
        if png is None:
            return f"*(figure {name} not found)*"
        figures.append((_load_png(png), caption))
        return f"*(figure: {caption}, shown below)*"

    text = _IMAGE.sub(swap, md.read_text(encoding="utf-8", errors="replace"))
    return text, figures


def routed_summary() -> str:
    """Routed end-to-end accuracy beside oracle accuracy per classify task, from eval.json."""
    path = report_file("eval.json")
    try:
        tasks = json.loads(path.read_text(encoding="utf-8")).get("tasks", {}) if path else {}
    except (OSError, ValueError, AttributeError):
        return ""
    rows = [(name, view, m) for name, t in tasks.items() if isinstance(t, dict)
            for view, m in (t.get("routed") or {}).items()]
    if not rows:
        return ""
    pct = lambda x: "–" if x is None else f"{100 * x:.1f} %"  # noqa: E731
    lines = ["### What routing costs per task", "",
             "Held-out texts sent as chat turns: *routed* counts a text right when the router picks "
             "this task's adapter and its label is right; *oracle* forces the right adapter.", "",
             "| task | view | n | oracle | routed | cost (points) |", "|---|---|---|---|---|---|"]
    lines += [f"| {html.escape(n)} | {html.escape(v)} | {m.get('n')} | {pct(m.get('oracle_accuracy'))} | "
              f"{pct(m.get('routed_accuracy'))} | {m.get('cost_points', '–')} |" for n, v, m in rows]
    return "\n".join(lines) + "\n\n---\n\n"


def refresh_eval():
    """Re-read the report (``bot eval`` may run while the demo is up)."""
    text, figures = eval_view()
    if text != NO_REPORT:
        text = routed_summary() + text
    return text, gr.Gallery(value=figures, visible=bool(figures))


# ------------------------------------------------------------------ layout
def header(session) -> str:
    loaded = ", ".join(f"`{n}`" for n in session.tasks) or "none"
    text = (f"## One backbone, many adapters\nLoaded adapters: {loaded}. The router picks one "
            "for each message; `/name text` or the dropdown forces one, `/help` lists them.")
    if session.failures:
        text += f"\n\n⚠ Not loaded: {', '.join(session.failures)} (see the Adapters tab)."
    return text


def example_prompts(session) -> list[tuple[str, str]]:
    """(adapter, prompt): each adapter's first route example."""
    return [(name, task.spec.route_examples[0]) for name, task in session.tasks.items()
            if task.spec.route_examples]


def abstain_toggle(session) -> dict:
    """The "ask when unsure" checkbox: on when validation showed it helps (bot.routing.abstain)."""
    rule = getattr(session.router, "abstain", None)
    if rule is None:
        return {"value": False, "interactive": False, "label": "Ask which adapter when unsure",
                "info": "no abstain threshold fitted for these routes (too few validation turns)"}
    why = "on by default: it helped on validation" if rule.on else "off by default: it did not help on validation"
    if rule.threshold <= 0:
        why += " (no score there at which routes were right less than half the time: it never asks)"
    return {"value": rule.on, "interactive": True, "label": "Ask which adapter when unsure",
            "info": f"below a route score of {rule.threshold:.2f} (fitted on validation); {why}"}


def _chat_tab(session) -> None:
    conv = gr.State(None)
    # No "share" button: conversations stay on this machine.
    chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=620, resizable=True,
                         feedback_options=(), buttons=["copy", "copy_all"])
    with gr.Row():
        msg = gr.Textbox(placeholder="Say hi, paste a review or a news headline…", lines=1,
                         max_lines=6, show_label=False, scale=5, elem_id="msg", autofocus=True)
        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
    with gr.Row():
        force = gr.Dropdown(["auto", *session.tasks], value="auto", label="Adapter",
                            info="auto lets the router choose", elem_id="force", scale=2)
        ask = gr.Checkbox(**abstain_toggle(session), elem_id="abstain", scale=2)
        clear = gr.Button("New conversation", elem_id="clear", scale=1)
    panel = gr.HTML(panel_html("", 0, "No turn yet."), elem_id="last-turn")
    prompts = example_prompts(session)
    if prompts:
        gr.Examples([[p] for _, p in prompts], inputs=[msg], label="Examples (one per adapter)",
                    example_labels=[f"{name}: {p}" for name, p in prompts], cache_examples=False)

    def on_send(message, force_name, state, ask_back):
        yield from respond(session, message, force_name, state, bool(ask_back))

    outputs = [chatbot, panel, conv, msg]
    for trigger in (msg.submit, send.click):
        trigger(on_send, [msg, force, conv, ask], outputs, show_progress="minimal")
    clear.click(lambda: ([], panel_html("", 0, "New conversation."), None, ""), None, outputs,
                queue=False)
    # The chatbot's own trash button must forget the history too, not just the bubbles.
    chatbot.clear(lambda: (panel_html("", 0, "New conversation."), None), None, [panel, conv],
                  queue=False)


def _eval_tab(app) -> None:
    report = gr.Markdown(NO_REPORT, elem_id="eval-report")
    figures = gr.Gallery(label="Figures", columns=2, format="png", visible=False, preview=False,
                         object_fit="contain", height="auto", elem_id="eval-figures")
    reload = gr.Button("Reload report")
    reload.click(refresh_eval, None, [report, figures], queue=False)
    app.load(refresh_eval, None, [report, figures], queue=False)


def build_app(session) -> gr.Blocks:
    """The demo's Blocks over ``session`` (a loaded ChatSession; it is forked per user)."""
    with gr.Blocks(title="bot demo", analytics_enabled=False) as app:
        gr.Markdown(header(session))
        with gr.Tab("Chat"):
            _chat_tab(session)
        with gr.Tab("Adapters"):
            gr.Markdown(adapter_cards(session), elem_id="adapter-cards")
        with gr.Tab("Evaluation"):
            _eval_tab(app)
    return app


def launch(*, adapters_dir=None, backbone: str | None = None, host: str = "127.0.0.1",
           port: int = 7860, share: bool = False, device: str | None = None,
           load_in: str | None = None) -> int:
    """`bot demo`: load the models once, serve on host:port until Ctrl-C.

    Args:
        adapters_dir: folder holding the adapter folders (None: the default).
        backbone: backbone name, folder, .gguf file or hub id (None: the embedded default).
        device: auto|cpu|cuda|mps (None: $BOT_DEVICE or auto).
        load_in: weight precision auto|fp32|bf16|8bit|4bit (None: $BOT_LOAD_IN or auto).
        host: interface to listen on; anything but loopback is announced with a warning.
        port: TCP port.
        share: ask Gradio for a public share link.
    """
    from bot.chat import ChatSession
    from bot.model.backbone import Backbone

    log.info("loading the backbone, adapters and router…")
    session = ChatSession.from_dir(Backbone.load(backbone, device=device, load_in=load_in), adapters_dir)
    for name, err in session.failures.items():
        log.warning("note: adapter %s not loaded: %s", name, err)
    log.info("warming up (serving engine, classifiers, router) … %.1f s", session.warm_up())
    app = build_app(session)
    app.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("warning: listening on %s; anyone who can reach it can use the demo", host)
    _, local_url, share_url = app.launch(
        server_name=host, server_port=int(port), share=bool(share),
        prevent_thread_lock=True, show_error=True, ssr_mode=False, quiet=True, theme=THEME, css=CSS,
        run_history=False)  # nothing recorded, and no page offering to upload runs elsewhere
    log.info("demo running at %s%s", local_url, f" (public link {share_url})" if share_url else "")
    app.block_thread()  # until Ctrl-C
    return 0
