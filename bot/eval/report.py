"""Write the evaluation report: ``eval.json`` (machine readable) and ``eval.md`` (for people).

``results`` schema (every part except ``tasks`` is optional)::

    {
      "meta": {"command": str, "backbone": str, "machine": str, "date": str, "seconds": float},
      "tasks": {
        "<name>": {                       # a classify task, e.g. "topic"
          "kind": "classify", "status": "ok", "n_test": int,
          "adapter": <classification_metrics>,
          "zero_shot": <classification_metrics> | None,
          "baseline": <classification_metrics> | None,     # TF-IDF + logistic regression
          "views": {"<view>": <classification_metrics>},   # e.g. "headline"; optional
          "verdict": str,                 # optional; derived with transfer_verdict if absent
          "confusion_png": "topic_confusion.png"          # optional; file name in out_dir
        },
        "<name>": {                       # a generate task, e.g. "chat"
          "kind": "generate", "status": "ok",
          "ppl_base": float, "ppl_adapter": float,         # held-out perplexity
          "samples": [{"prompt": str, "base": str, "adapter": str}],
          "verdict": str                  # optional
        },
        "<name>": {"status": "failed", "error": str}
      },
      "router": <router_metrics> + {"confusion_png": str} | None,
      "curves": {"<task>": {"points": {"<series>": [[n_train, accuracy], ...]}, "png": str}}
    }

``<classification_metrics>`` and ``<router_metrics>`` are the dicts returned by
``bot.eval.metrics``. Accuracies are fractions in [0, 1]. PNG names are relative to
``out_dir``; a named (or default) PNG that does not exist yet is drawn from the
data when ``plots`` is true, so the markdown never links a missing image.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from bot.eval.helpful import TARGETS
from bot.eval.metrics import comparison_text, transfer_verdict
from bot.eval.plots import plot_bar_summary, plot_confusion, plot_learning_curve
from bot.util.fsutil import atomic_write_text

DASH = "—"
MAX_CELL = 300  # long generations would make the markdown tables unreadable


def _jsonable(obj):
    """Plain JSON types only; NaN/inf become None so the file is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _pct(x) -> str:
    return DASH if x is None else f"{100 * x:.1f} %"


def _pct_ci(m: dict | None) -> str:
    """``95.0 % (93.4-96.2)``: an accuracy with its 95 % interval when one was computed."""
    if not m or m.get("accuracy") is None:
        return DASH
    ci = m.get("interval")
    return _pct(m["accuracy"]) + (f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if ci else "")


def _num(x, fmt: str = ".3f") -> str:
    return DASH if x is None else format(x, fmt)


def _cell(text) -> str:
    """Make arbitrary text safe inside one markdown table cell."""
    s = str(text if text is not None else "").strip()
    if len(s) > MAX_CELL:
        s = s[:MAX_CELL] + "…"
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _acc(task: dict, key: str):
    m = task.get(key)
    return m.get("accuracy") if isinstance(m, dict) else None


def _kind(task: dict) -> str:
    return task.get("kind") or ("generate" if "ppl_adapter" in task else "classify")


def _failed(task: dict) -> bool:
    return task.get("status", "ok") != "ok"


def _ppl_change(task: dict) -> str:
    base, ada = task.get("ppl_base"), task.get("ppl_adapter")
    if base is None or ada is None:
        return f"held-out perplexity {_num(base, '.2f')} → {_num(ada, '.2f')}"
    rel = f" ({100 * (ada - base) / base:+.1f} %)" if base and math.isfinite(base) else ""
    return f"held-out perplexity {base:.2f} → {ada:.2f}{rel}"


def _verdict(task: dict) -> str:
    if task.get("verdict"):
        return task["verdict"]
    if _kind(task) == "generate":
        return _ppl_change(task)
    return transfer_verdict(_acc(task, "adapter"), _acc(task, "baseline"), _acc(task, "zero_shot"))


def _ensure_png(out_dir: Path, given: str | None, default: str, draw, plots: bool) -> str | None:
    """Return the image name if it exists after optionally drawing it, else None.

    A name the caller gave is drawn only when missing (the caller may have drawn it);
    a default name is always redrawn so a stale file from an earlier run is not linked.
    """
    name = given or default
    if plots and (not given or not (out_dir / name).exists()):
        draw(out_dir / name)
    return name if (out_dir / name).exists() else None


def _summary(tasks: dict) -> list[str]:
    rows = []
    for name, t in tasks.items():
        if _failed(t):
            rows.append([name, "failed", DASH, DASH, t.get("error", "")])
        elif _kind(t) == "base":
            rows.append([name, "bare backbone", DASH, DASH, t.get("verdict", "")])
        elif _kind(t) == "generate":
            rows.append([name, f"ppl {_num(t.get('ppl_adapter'), '.2f')}",
                         f"ppl {_num(t.get('ppl_base'), '.2f')}", DASH,
                         _ppl_change(t) + ("" if not t.get("verdict") else f". {t['verdict']}")])
        else:
            rows.append([name, _pct_ci(t.get("adapter")), _pct(_acc(t, "zero_shot")),
                         _pct_ci(t.get("baseline")), _verdict(t)])
    return _table(["task", "adapter (95 % interval)", "base zero-shot",
                   "TF-IDF baseline (95 % interval)", "verdict"], rows)


def _prf_rows(m: dict) -> list[list]:
    return [[lab, _num(c["precision"]), _num(c["recall"]), _num(c["f1"]), c["support"]]
            for lab, c in m.get("per_class", {}).items()]


def _router(r: dict, out_dir: Path, plots: bool) -> list[str]:
    lines = ["## Router", "",
             f"Accuracy {_pct(r.get('accuracy'))} on {r.get('n', DASH)} prompts, "
             f"macro-F1 {_num(r.get('macro_f1'))}, fallback rate {_pct(r.get('fallback_rate'))}.", ""]
    second = r.get("second_stage")
    lines += [f"Second stage: the route adapter was asked on {_pct(second['asked_rate'])} of these turns "
              f"(first stage's best score below {second['gate']:.2f}; its weight {second['weight']:.1f})."
              if second else "Second stage: off (no route adapter fitted for these routes; "
              "`bot train-router`).", ""] if "second_stage" in r else []
    if r.get("second_stage_note"):
        lines += [f"Second stage for these routes: {r['second_stage_note']}.", ""]
    lines += _abstain(r.get("abstain"))
    lines += _table(["route", "precision", "recall", "F1", "support"], _prf_rows(r)) + [""]
    png = _ensure_png(out_dir, r.get("confusion_png"), "router_confusion.png",
                      lambda p: plot_confusion(r["confusion"], r["labels"], "router", p),
                      plots and "confusion" in r)
    if png:
        lines += [f"![router confusion matrix]({png})", ""]
    if r.get("by_source"):
        lines += ["Accuracy by source of the turn:", ""]
        lines += _table(["source: true adapter", "accuracy", "n"],
                        [[k, _pct(v["accuracy"]), v["n"]] for k, v in r["by_source"].items()]) + [""]
    if r.get("median_route_ms") is not None:
        lines += [f"Median routing time: {_num(r['median_route_ms'], '.1f')} ms per turn.", ""]
    if r.get("mistakes"):
        lines += ["Some misrouted turns:", ""]
        lines += _table(["turn", "true", "routed to"],
                        [[m["text"], m["want"], m["got"]] for m in r["mistakes"][:12]]) + [""]
    return lines


def _abstain(rule: dict | None) -> list[str]:
    """The abstain threshold: how it was fitted on validation and what it does held out."""
    if not rule:
        return []
    val, held = rule.get("validation") or {}, rule.get("heldout") or {}
    default = ("on by default: on validation it raised (right - wrong) per turn from "
               f"{_num(val.get('utility_never'))} to {_num(val.get('utility'))}"
               if rule.get("on_by_default") else
               "off by default (on validation it did not beat always routing); available per request")
    return [f"**Abstain when unsure:** below a route score of {_num(rule.get('threshold'))} (fitted on "
            f"{val.get('n', DASH)} validation turns, scoring +1 for a right route, -1 for a wrong one "
            f"and 0 for a clarifying question), the turn gets a question listing the likely routes; "
            f"{default}.", "",
            *_table(["turns", "abstain rate", "accuracy of the rest", "accuracy without abstaining",
                     "wrong routes caught", "right routes lost"],
                    [["validation (weighted)", _pct(val.get("abstain_rate")), _pct(val.get("accuracy_rest")),
                      _pct(val.get("accuracy_all")), DASH, DASH],
                     [f"held out ({held.get('n', DASH)})", _pct(held.get("abstain_rate")),
                      _pct(held.get("accuracy_rest")), _pct(held.get("accuracy_all")),
                      held.get("wrong_caught", DASH), held.get("right_lost", DASH)]]), ""]


def _routed(tasks: dict) -> list[str]:
    """Routed end to end beside the right adapter forced, per classify task and view."""
    rows = []
    for name, t in tasks.items():
        for view, m in (t.get("routed") or {}).items():
            ab = m.get("abstain") or {}
            rows.append([name, view, m.get("n"), _pct(m.get("oracle_accuracy")), _pct(m.get("routed_accuracy")),
                         DASH if m.get("cost_points") is None else f"{m['cost_points']:.1f}",
                         _pct(m.get("routed_to_adapter")),
                         ", ".join(f"{k} {v}" for k, v in (m.get("elsewhere") or {}).items()) or DASH,
                         f"{_pct(ab.get('abstain_rate'))} / {_pct(ab.get('routed_accuracy_rest'))}" if ab else DASH])
    if not rows:
        return []
    return ["## Routed end to end", "",
            "Each held-out text of a classify task is sent as a chat turn: the router picks the adapter, "
            "and the text counts as right only when it reaches this task's adapter and the label is "
            "right. Oracle = the right adapter forced (the adapter's own accuracy); the cost is what "
            "routing takes away, in points.", "",
            *_table(["task", "view", "n", "oracle (adapter forced)", "routed", "routing cost (points)",
                     "routed to the adapter", "the others went to", "abstain: rate / routed accuracy of the rest"],
                    rows), ""]


def _latency(lat: dict) -> list[str]:
    """End-to-end medians measured through ChatSession (route + analysis + adapter)."""
    rows = [["classification turn, end to end", _num(lat.get("classify_turn_ms"), ".0f"), lat.get("n_classify")],
            ["first streamed token of a chat reply", _num(lat.get("first_token_ms"), ".0f"), lat.get("n_chat")],
            ["routing only, inside those turns", _num(lat.get("route_ms_in_turn"), ".1f"), lat.get("n_classify")]]
    for isa, m in (lat.get("route_isa") or {}).items():
        env = " ".join(f"{k}={v}" for k, v in (m.get("env") or {}).items())
        rows.append([f"routing a short turn, cold cache, CPU {isa} ({m.get('aten_capability')}"
                     + (f"; {env}" if env else "") + f"); p90 {_num(m.get('p90_ms'), '.1f')}",
                     _num(m.get("median_ms"), ".1f"), m.get("n")])
    return ["## Latency (median ms)", ""] + _table(["what", "ms", "n"], rows) + [""]


def _classify_section(name: str, t: dict, out_dir: Path, plots: bool) -> list[str]:
    ada = t.get("adapter") or {}
    scored = t.get("scored") or f"{t.get('n_test', ada.get('n', DASH))} held-out examples"
    lines = [f"## {name} (classify)", "",
             f"Scored on {scored}. Accuracy (95 % Wilson interval): adapter "
             f"{_pct_ci(ada)}, base zero-shot {_pct(_acc(t, 'zero_shot'))}, TF-IDF baseline "
             f"{_pct_ci(t.get('baseline'))}. Adapter macro-F1 {_num(ada.get('macro_f1'))}.",
             "", _verdict(t), ""]
    windowed = _windowed_text(t)
    if windowed:
        lines += [windowed, ""]
    if ada.get("per_class"):
        lines += _table(["class", "precision", "recall", "F1", "support"], _prf_rows(ada)) + [""]
    png = _ensure_png(out_dir, t.get("confusion_png"), f"{name}_confusion.png",
                      lambda p: plot_confusion(ada["confusion"], ada["labels"], f"{name} adapter", p),
                      plots and "confusion" in ada)
    if png:
        lines += [f"![{name} confusion matrix]({png})", ""]
    views = t.get("views") or {}
    if views:
        trained = t.get("baseline_trained_on")
        lines += ["Views of the same test set" + (
            f" (the TF-IDF baseline trains on the adapter's own examples: {', '.join(trained)}):"
            if trained else ":"), ""]
        vbase = t.get("views_baseline") or {}
        vcmp = t.get("views_vs_baseline") or {}
        gaps = {v: _gap(m, vbase.get(v)) for v, m in views.items()}
        rows = [[v, m.get("n", DASH), _pct(m.get("accuracy")), _num(m.get("macro_f1")),
                 _pct((vbase.get(v) or {}).get("accuracy")),
                 comparison_text(vcmp[v], "TF-IDF") if v in vcmp else _gap_text(gaps[v])]
                for v, m in views.items()]
        lines += _table(["view", "n", "adapter accuracy", "adapter macro-F1", "TF-IDF baseline",
                         "adapter vs TF-IDF"], rows) + [""]
        if vcmp:  # the paired interval decides: a lead inside the noise is a tie
            losing = [v for v in views if (vcmp.get(v) or {}).get("verdict") in ("loses", "ties")]
            what = "does not beat (ties or loses to)"
        else:
            losing = [v for v, gap in gaps.items() if gap is not None and gap <= 0]
            what = "does not beat"
        if losing:
            lines += [f"On {', '.join(losing)}, the adapter {what} the TF-IDF baseline.", ""]
    return lines


def _windowed_text(t: dict) -> str:
    """Which texts were longer than the adapter's ``max_length`` and read as windows."""
    parts = []
    # eval_classify keeps the whole text's scores under "adapter" and each view's under "views"
    for view, m in {"text": t.get("adapter") or {}, **(t.get("views") or {})}.items():
        w = m.get("windowed") or {}
        if w.get("texts"):
            limit = (f"; {w['at_limit']} were longer than the limit of {w['max_windows']} windows "
                     "and were read from their start only" if w.get("at_limit") else "")
            parts.append(f"{view}: {w['texts']} of {m.get('n', DASH)} texts, {w['windows']} windows "
                         f"in all{limit}")
    if not parts:
        return ""
    return ("Read whole as overlapping windows (longer than the adapter's max_length; the "
            "windows' log-probabilities are averaged): " + "; ".join(parts) + ".")


def _gap(adapter: dict, baseline: dict | None) -> float | None:
    """The adapter's lead over the baseline in points (None when either is missing)."""
    if not baseline or adapter.get("accuracy") is None or baseline.get("accuracy") is None:
        return None
    return 100 * (adapter["accuracy"] - baseline["accuracy"])


def _gap_text(gap: float | None) -> str:
    if gap is None:
        return DASH
    return f"+{gap:.1f} points" if gap > 0 else f"loses by {-gap:.1f} points"  # a tie loses too


def _generate_section(name: str, t: dict) -> list[str]:
    change = _ppl_change(t)
    lines = [f"## {name} (generate)", "", change[0].upper() + change[1:] + ".", ""]
    if t.get("verdict"):
        lines += [t["verdict"], ""]
    samples = t.get("samples") or []
    if samples:
        lines += _table(["prompt", "base", "adapter"],
                        [[s.get("prompt"), s.get("base"), s.get("adapter")] for s in samples]) + [""]
    return lines + _instructions(name, t.get("instructions"))


def _instructions(name: str, ins: dict | None) -> list[str]:
    """How helpful the adapter stays on hand-written requests (bot.eval.helpful)."""
    if not ins:
        return []

    met = ins.get("met") or {}
    word = {True: "met", False: "NOT MET", None: DASH}
    rows = [["hand-written answers' perplexity, adapter / base",
             f"{_num(ins.get('ppl_ratio'), '.3f')} ({_num(ins.get('ppl_adapter'), '.2f')} / "
             f"{_num(ins.get('ppl_base'), '.2f')})", f"<= {TARGETS['ppl_ratio']}", word[met.get("ppl_ratio")]],
            ["median reply length (words), adapter / base",
             f"{_num(ins.get('length_ratio'), '.2f')} ({ins.get('length_adapter')} / {ins.get('length_base')})",
             f">= {TARGETS['length_ratio']}", word[met.get("length_ratio")]],
            ["held-out dialogue perplexity change", _pct(ins.get("dialogue_ppl_change")),
             f"<= {TARGETS['dialogue_ppl_change']:+.0%}", word[met.get("dialogue_ppl_change")]]]
    lines = [f"### {name}: does it stay helpful?", "",
             f"{ins.get('n')} requests and questions with hand-written answers (never trained on); "
             f"replies greedy, at most {ins.get('max_tokens')} tokens. Router's picks: "
             + ", ".join(f"{k} {v}" for k, v in sorted((ins.get("routed_to") or {}).items())) + ".", ""]
    lines += _table(["figure", "measured", "target", ""], rows) + [""]
    lines += _table(["prompt", "base", name, "router's pick"],
                    [[s["prompt"], s["base"], s["adapter"], f"**{s['route']}**: {s['routed']}"]
                     for s in ins.get("samples") or []]) + [""]
    return lines


def _curves(curves: dict, out_dir: Path, plots: bool) -> list[str]:
    lines = []
    for name, c in curves.items():
        pts = c.get("points") or {}
        png = _ensure_png(out_dir, c.get("png"), f"{name}_learning_curve.png",
                          lambda p, n=name, q=pts: plot_learning_curve(q, f"{n} learning curve", p),
                          plots and bool(pts))
        if png:
            lines += [f"![{name} learning curve]({png})", ""]
    return (["## Learning curves", ""] + lines) if lines else []


def write_report(results: dict, out_dir, plots: bool = True) -> tuple[Path, Path]:
    """Write ``eval.json`` and ``eval.md`` into ``out_dir``.

    Args:
        results: dict following the module docstring schema.
        out_dir: directory to write into (created if needed).
        plots: draw referenced PNGs that are missing from ``out_dir``.

    Returns:
        (path of eval.json, path of eval.md).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = results.get("tasks") or {}
    ok = {n: t for n, t in tasks.items() if not _failed(t)}

    lines = ["# Evaluation report", ""] + _summary(tasks) + [""]
    bars = [{"task": n, "adapter": _acc(t, "adapter"), "base zero-shot": _acc(t, "zero_shot"),
             "tfidf baseline": _acc(t, "baseline")}
            for n, t in ok.items() if _kind(t) == "classify"]
    png = _ensure_png(out_dir, None, "summary.png", lambda p: plot_bar_summary(bars, p), plots and bool(bars))
    if png and bars:
        lines += [f"![accuracy per task]({png})", ""]
    meta = results.get("meta") or {}
    if meta:
        lines += ["Run: " + ", ".join(f"{k} `{v}`" for k, v in meta.items()), ""]
    if results.get("router"):
        lines += _router(results["router"], out_dir, plots)
    lines += _routed(ok)
    if results.get("latency"):
        lines += _latency(results["latency"])
    for name, t in ok.items():
        if _kind(t) == "base":
            continue
        lines += _generate_section(name, t) if _kind(t) == "generate" else _classify_section(name, t, out_dir, plots)
    lines += _curves(results.get("curves") or {}, out_dir, plots)
    failed = {n: t for n, t in tasks.items() if _failed(t)}
    if failed:
        lines += ["## Failed adapters", ""]
        lines += [f"- **{n}** ({t.get('status', 'failed')}): {_cell(t.get('error', 'no error message'))}"
                  for n, t in failed.items()] + [""]

    json_path, md_path = out_dir / "eval.json", out_dir / "eval.md"
    atomic_write_text(json_path, json.dumps(_jsonable(results), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write_text(md_path, "\n".join(lines))
    return json_path, md_path
