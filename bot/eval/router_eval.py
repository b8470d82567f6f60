"""``bot eval --only router``: the router's held-out accuracy (and routing time) in a minute.

The full ``bot eval`` also scores every adapter, which takes a quarter of an hour; the router's
figures do not depend on that. This writes the same ``router`` section (and ``latency.route_*``)
into ``OUT/eval.json``, keeping every other section of an existing report, and redraws
``eval.md``. The router is built exactly as the full run builds it (``build_router``, fitted on
the validation splits) and scored on the same turns (test splits + hand-written turns).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from bot.errors import DataError
from bot.manifests.spec import require_usable, scan
from bot.routing import abstain, build_router
from bot.routing.latency import record_both_isas
from bot.routing.second import attach_if_trained

log = logging.getLogger(__name__)


def run_router_eval(*, adapters_dir, out="reports", names: list[str] | None = None,
                    latency: bool = True, command_line: str = "") -> dict:
    """Score the router on the held-out turns; merge its section into ``out/eval.json``.

    Args:
        adapters_dir: folder holding ``<name>/adapter.yaml``.
        out: report folder; an existing ``eval.json`` there keeps its other sections.
        names: the routes (None or empty: every adapter folder, as the demo routes them).
        latency: also time ``route()`` on 200 short turns per CPU setting (bot.routing.latency).
        command_line: recorded as ``router.command``.

    Returns:
        the whole report dict written to ``out/eval.json``.
    """
    # lazy: bot.eval.evaluate imports sklearn, transformers
    from bot.eval.evaluate import eval_router
    from bot.eval.report import write_report  # lazy: bot.eval.report imports matplotlib, sklearn

    specs, broken = scan(adapters_dir)
    require_usable(specs, broken)
    if names:
        specs = [s for s in specs if s.name in names]
    if len(specs) < 2:
        raise DataError(f"the router needs at least two adapters under {adapters_dir}, found "
                        f"{[s.name for s in specs]}")
    t0 = time.perf_counter()
    router = build_router(specs)
    if attach_if_trained(router, adapters_dir):  # the second stage, with a backbone only if it has one
        abstain.attach(router, specs)  # its threshold is fitted on the scores as served
    section = eval_router(specs, session=_RouterOnly(router))
    section["command"] = command_line
    section["date"] = time.strftime("%Y-%m-%d %H:%M")
    section["seconds"] = round(time.perf_counter() - t0, 1)
    results = _existing(Path(out) / "eval.json")
    results["router"] = section
    if latency:
        record_both_isas(results.setdefault("latency", {}), adapters_dir)
    write_report(results, out)
    return results


class _RouterOnly:
    """What ``eval_router`` reads from a chat session: only its router."""

    def __init__(self, router):
        self.router = router


def _existing(path: Path) -> dict:
    """The report already in ``path`` (another run's adapter figures stay), else a new one."""
    if not path.exists():
        return {"tasks": {}}
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path} ({err}). Fix: delete it or pass another --out") from err
    return results if isinstance(results, dict) else {"tasks": {}}


def summary_lines(router: dict, latency: dict | None = None) -> list[str]:
    """The figures a person reads after ``bot eval --only router``: accuracy by source, ms."""
    lines = [f"router accuracy {100 * router['accuracy']:.1f}% on {router['n']} held-out turns "
             f"({router['n_handwritten']} hand-written)"]
    lines += [f"  {source:<28} {100 * v['accuracy']:5.1f}%  n={v['n']}"
              for source, v in router["by_source"].items()]
    second = router.get("second_stage")
    lines.append(f"second stage asked on {100 * second['asked_rate']:.1f}% of turns (gate {second['gate']:.2f})"
                 if second else "second stage off (bot train-router fits one)")
    rule = router.get("abstain")
    if rule:
        held = rule["heldout"]
        lines.append(f"abstain below {rule['threshold']:.3f} ({'on' if rule['on_by_default'] else 'off'} by "
                     f"default): would ask back on {100 * held['abstain_rate']:.1f}% of these turns, the "
                     f"rest {100 * (held['accuracy_rest'] or 0):.1f}% right")
    if latency and "route_isa" in latency:
        lines.append("median route() time, short turns, no cache hits: " + ", ".join(
            f"{name} {v['median_ms']:.1f} ms" for name, v in latency["route_isa"].items()))
    return lines
