"""Regression report for a change of the route set: what a new, removed or retrained route did
to every other route.

Adding a route can take turns away from the others; nothing else does (the adapters' weights
are never touched by a change to another route: the report proves it with their digests). So
for every change (``bot add --train``, ``bot rm``, ``bot train`` of a route, an adapter loaded
into a running server) the router as served before and the router as served after both route
the same held-out turns: every route's test split (as ``bot eval`` draws it) plus the
hand-written test turns. The report gives each route's accuracy before and after, the turns
that changed route, each adapter's held-out score with its weight digests before and after,
and a warning naming the moved turns when an existing route loses more than ``DROP_POINTS``.
``strict`` callers refuse such a change and leave everything as it was.

Reports are printed and written to ``ADAPTERS_DIR/.changes/<time>-<action>-<name>.{md,json}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from bot.manifests.versions import score_line
from bot.routing.route_data import route_texts, router_test_set
from bot.util.fsutil import atomic_write_text

log = logging.getLogger(__name__)

DROP_POINTS = 1.0  # an existing route losing more than this (accuracy points) is a regression
CHANGES = ".changes"
WEIGHT_FILES = ("adapter_model.safetensors", "head.safetensors")
SHOWN_MOVED = 25  # moved turns listed in a report (all of them are in the JSON)


def weight_digest(folder) -> str:
    """sha256 over an adapter folder's weight files (LoRA and head), or 'no weights'."""
    h, found = hashlib.sha256(), False
    for name in WEIGHT_FILES:
        path = Path(folder) / name
        if path.is_file():
            found = True
            h.update(name.encode() + b"\0")
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16] if found else "no weights"


def adapter_states(specs) -> dict[str, dict]:
    """Per adapter: its weight digest and its held-out scores (metrics.json), now."""
    out = {}
    for spec in specs:
        folder = Path(spec.folder) if spec.folder else None
        try:
            metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8")) if folder else {}
        except (OSError, ValueError):
            metrics = {}
        out[spec.name] = {"digest": weight_digest(folder) if folder else "no weights",
                          "score": score_line(metrics) if spec.kind != "base" else "the bare backbone",
                          "date": metrics.get("date") if isinstance(metrics, dict) else None}
    return out


def heldout_turns(specs, routers) -> list[tuple[str, str]]:
    """(text, route) held-out turns of every route in ``specs``, none a route example of any
    of ``routers``: the test splits (as ``bot eval`` draws them) and the hand-written turns."""
    seen = set()
    for router in routers:
        seen |= route_texts(router)
    return router_test_set(specs, exclude=seen)


def compare(before, after, turns: list[tuple[str, str]]) -> dict:
    """Route ``turns`` with both routers; accuracy per route, and the turns that moved.

    Args:
        before, after: the routers as served before and after the change.
        turns: (text, true route) pairs.
    """
    texts = [t for t, _ in turns]
    truth = [a for _, a in turns]
    old = [c.adapter for c in before.route_all(texts)]
    new = [c.adapter for c in after.route_all(texts)]
    per_route = {}
    for route in sorted(set(truth)):
        idx = [i for i, y in enumerate(truth) if y == route]
        acc_b = (sum(old[i] == route for i in idx) / len(idx)) if route in before.names else None
        acc_a = (sum(new[i] == route for i in idx) / len(idx)) if route in after.names else None
        status = "new" if acc_b is None else "removed" if acc_a is None else ""
        change = round(100 * (acc_a - acc_b), 2) if acc_b is not None and acc_a is not None else None
        per_route[route] = {"n": len(idx), "before": acc_b, "after": acc_a, "change_points": change,
                            "status": status}
    both = [i for i, y in enumerate(truth) if y in before.names and y in after.names]
    moved = [{"text": texts[i][:160], "true": truth[i], "before": old[i], "after": new[i]}
             for i in range(len(texts)) if old[i] != new[i]]
    # the turns the change got wrong first, then the ones it got right, then the rest
    moved.sort(key=lambda t: (t["before"] != t["true"], t["after"] != t["true"]))
    return {"n": len(turns), "per_route": per_route, "moved": moved, "n_moved": len(moved),
            "overall": {"n": len(both),
                        "before": sum(old[i] == truth[i] for i in both) / len(both) if both else None,
                        "after": sum(new[i] == truth[i] for i in both) / len(both) if both else None}}


def regressions(router_part: dict, existing: list[str]) -> dict[str, float]:
    """Existing routes that lost more than DROP_POINTS: {route: points lost}."""
    out = {}
    for route in existing:
        m = router_part["per_route"].get(route)
        if m and m["change_points"] is not None and -m["change_points"] > DROP_POINTS:
            out[route] = round(-m["change_points"], 2)
    return out


def build_report(*, action: str, name: str, before_specs, after_specs, before_router, after_router,
                 states_before: dict, states_after: dict, same_router: bool = False,
                 router_part: dict | None = None) -> dict:
    """Everything a change report says, as a dict (see :func:`render`).

    Args:
        same_router: the routers are the same by construction (the manifests that shape them
            did not change): the turns are not routed again, none can move.
        router_part: the routers' comparison when the caller already made it (``compare``).
    """
    before_names = [s.name for s in before_specs]
    after_names = [s.name for s in after_specs]
    existing = [n for n in before_names if n in after_names]
    report = {"action": action, "name": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "routes_before": before_names, "routes_after": after_names,
              "second_stage_before": getattr(before_router, "second_note", ""),
              "second_stage_after": getattr(after_router, "second_note", ""),
              "second_stage_check": getattr(after_router, "second_check", None),
              "abstain_before": _abstain_figures(before_router),
              "abstain_after": _abstain_figures(after_router)}
    if router_part is not None:
        report["router"] = router_part
    elif same_router:
        report["router"] = {"same": True, "n": 0, "per_route": {}, "moved": [], "n_moved": 0,
                            "overall": {"n": 0, "before": None, "after": None}}
    else:
        turns = heldout_turns(_union(before_specs, after_specs), [before_router, after_router])
        report["router"] = {"same": False, **compare(before_router, after_router, turns)}
    adapters = {}
    for n in sorted(set(states_before) | set(states_after)):
        b, a = states_before.get(n), states_after.get(n)
        adapters[n] = {"score_before": b and b["score"], "score_after": a and a["score"],
                       "digest_before": b and b["digest"], "digest_after": a and a["digest"],
                       "unchanged": bool(b and a and b["digest"] == a["digest"])}
    report["adapters"] = adapters
    # the changed adapter itself may change; every other one must not
    others = [n for n in existing if n != name]
    report["touched"] = [n for n in others if not adapters[n]["unchanged"]]
    drops = regressions(report["router"], existing)
    report["drops"] = drops
    report["warnings"] = [_drop_warning(r, p, report["router"]) for r, p in drops.items()]
    report["warnings"] += [f"adapter '{n}' changed although the change was to '{name}': weights "
                           f"{adapters[n]['digest_before']} -> {adapters[n]['digest_after']}"
                           for n in report["touched"]]
    return report


def _abstain_figures(router) -> dict | None:
    rule = getattr(router, "abstain", None)
    return None if rule is None else {"threshold": rule.threshold, "on": rule.on, **rule.figures}


def _abstain_line(figures: dict | None) -> str:
    if not figures:
        return "none fitted"
    return (f"below {figures['threshold']:.3f}, {'on' if figures['on'] else 'off'} by default (validation, "
            f"{figures.get('n', '?')} turns: asks back on {_pct(figures.get('abstain_rate'))}, the rest "
            f"{_pct(figures.get('accuracy_rest'))} right, {_pct(figures.get('accuracy_all'))} without asking)")


def _union(before_specs, after_specs) -> list:
    specs = {s.name: s for s in before_specs}
    specs.update({s.name: s for s in after_specs})
    return [specs[n] for n in sorted(specs)]


def _drop_warning(route: str, points: float, router_part: dict) -> str:
    m = router_part["per_route"][route]
    moved = [t for t in router_part["moved"] if t["true"] == route and t["before"] == route]
    shown = "; ".join(f"{t['text'][:70]!r} -> {t['after']}" for t in moved[:8])
    return (f"route '{route}' lost {points:.1f} points ({_pct(m['before'])} -> {_pct(m['after'])} on "
            f"{m['n']} held-out turns); {len(moved)} of its turns moved away: {shown}")


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def render(report: dict) -> str:
    """The report as markdown (also readable as plain text in a terminal)."""
    r = report["router"]
    lines = [f"# Route set change: {report['action']} {report['name']} ({report['date']})", "",
             f"Routes before: {', '.join(report['routes_before']) or 'none'}; after: "
             f"{', '.join(report['routes_after']) or 'none'}.", ""]
    if report.get("refused"):
        lines += [f"**REFUSED (--strict)**: {report['refused']}. Nothing was changed.", ""]
    for warning in report["warnings"]:
        lines += [f"**WARNING**: {warning}", ""]
    if r["same"]:
        lines += ["Router: unchanged. The manifests that shape it (routes, examples, data, seeds) are "
                  "the same before and after, so every turn routes as before.", ""]
    else:
        lines += [f"Router on {r['n']} held-out turns (test splits and hand-written turns, never used to "
                  f"fit it): {_pct(r['overall']['before'])} -> {_pct(r['overall']['after'])} on the "
                  f"{r['overall']['n']} turns of routes present before and after; {r['n_moved']} "
                  "turns changed route.", "",
                  "| route | held-out turns | before | after | change (points) |", "|---|---|---|---|---|"]
        for route, m in r["per_route"].items():
            change = m["status"] or ("—" if m["change_points"] is None else f"{m['change_points']:+.1f}")
            lines.append(f"| {route} | {m['n']} | {_pct(m['before'])} | {_pct(m['after'])} | {change} |")
        lines.append("")
        if r["moved"]:
            lines += [f"Turns that changed route ({min(len(r['moved']), SHOWN_MOVED)} of {r['n_moved']}; "
                      "all in the JSON):", "", "| turn | true route | before | after |", "|---|---|---|---|"]
            lines += [f"| {_cell(t['text'])} | {t['true']} | {t['before']} | {t['after']} |"
                      for t in r["moved"][:SHOWN_MOVED]]
            lines.append("")
    lines += [f"Second stage before: {report['second_stage_before'] or 'none'}.",
              f"Second stage after: {report['second_stage_after'] or 'none'}.", "",
              f"Abstain before: {_abstain_line(report.get('abstain_before'))}.",
              f"Abstain after: {_abstain_line(report.get('abstain_after'))}.", "",
              "Adapters (held-out scores from each metrics.json; weights compared by sha256 digest):", "",
              "| adapter | held-out score before | after | weights before | after | |", "|---|---|---|---|---|---|"]
    for n, a in report["adapters"].items():
        verdict = ("unchanged (same weights)" if a["unchanged"] else
                   "new" if a["digest_before"] is None else "removed" if a["digest_after"] is None
                   else "retrained" if n == report["name"] else "CHANGED")
        lines.append(f"| {n} | {a['score_before'] or '—'} | {a['score_after'] or '—'} | "
                     f"{a['digest_before'] or '—'} | {a['digest_after'] or '—'} | {verdict} |")
    lines.append("")
    for extra in report.get("notes", []):
        lines += [extra, ""] if extra else []
    if report.get("seconds"):
        lines += ["Time (s): " + ", ".join(f"{k.replace('_', ' ')} {v:.0f}"
                                         for k, v in report["seconds"].items()), ""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def save(report: dict, adapters_dir) -> Path:
    """Write the report as ``.md`` and ``.json`` under ``ADAPTERS_DIR/.changes/``; the md path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(adapters_dir) / CHANGES / f"{stamp}-{report['action'].replace(' ', '-')}-{report['name']}"
    atomic_write_text(base.with_suffix(".json"), json.dumps(report, indent=1, default=str) + "\n")
    return atomic_write_text(base.with_suffix(".md"), render(report) + "\n")


def served_router(specs, adapters_dir, backbone=None, encoder=None):
    """The router as the demo, ``bot chat`` and ``bot serve`` build it over ``specs``."""
    from bot.routing.build import build_router  # lazy: bot.routing.build imports transformers

    return build_router(specs, encoder, backbone=backbone, adapters_dir=adapters_dir)


def same_routes(before_specs, after_specs, encoder) -> bool:
    """True when both route sets build the same router (bot.routing.build.router_key)."""
    # lazy: bot.routing.build imports transformers
    from bot.routing.build import default_fallback, router_key

    hint = getattr(encoder, "name_hint", "minilm")
    return (router_key(before_specs, hint + f"|{default_fallback(before_specs)}")
            == router_key(after_specs, hint + f"|{default_fallback(after_specs)}"))


def on_adapter_loaded(state, name: str, strict: bool = False) -> dict:
    """For ``POST /v1/load_lora_adapter``: route over the loaded adapter too, with a report.

    Call it after ``state.load_adapter(name, folder)`` succeeded. It builds the router over
    every served task (the new one included), compares it with ``state.router`` on the
    held-out turns and, unless ``strict`` refuses a regression, swaps it in; the report is
    returned (for the response body) and saved beside the adapters. ``state`` needs
    ``router``, ``tasks`` and ``backbone`` (bot.serve.state.ServerState).
    """
    after_specs = [t.spec for t in state.tasks.values()]
    before_specs = [s for s in after_specs if s.name != name]
    folder = Path(state.tasks[name].spec.folder) if name in state.tasks else None
    adapters_dir = next((Path(s.folder).parent for s in before_specs if s.folder), folder)
    before = state.router
    states_before = adapter_states(before_specs)  # read before, and again after
    after = served_router(sorted(after_specs, key=lambda s: s.name), adapters_dir, state.backbone,
                          before.encoder if before is not None else None)
    report = build_report(action="load", name=name, before_specs=before_specs, after_specs=after_specs,
                          before_router=before or after, after_router=after,
                          states_before=states_before, states_after=adapter_states(after_specs),
                          same_router=before is None)
    if strict and report["drops"]:
        report["refused"] = f"an existing route lost more than {DROP_POINTS:.0f} point(s)"
        state.unload_adapter(name)  # refused: the server is left as it was
    else:
        state.router = after
    report["applied"] = not report.get("refused")
    if adapters_dir is not None:
        save(report, adapters_dir)
    return report
