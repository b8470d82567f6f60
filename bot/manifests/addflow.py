"""``bot add NAME --from FILE --train`` and ``bot rm NAME``: a route set change in one command,
with its regression report (bot.routing.changes) and a version to roll back to (bot.manifests.versions).

Adding a task: the file is checked and scaffolded as ``bot add`` does, the adapter is trained
with the manifest's default training (``bot train``'s own path) into a hidden staging folder,
the router is refitted for the new route set (the first stage is rebuilt from the manifests
in a minute or two; the second stage, a classify adapter over the old routes, is not
retrained: it is asked only about the routes it knows, and only if that beats the first
stage alone on validation, see bot.routing.second.extension_check), and the adapter is scored
on its held-out split, alone and routed. Only then does the staging folder move into place;
with ``strict`` a regression of an existing route refuses the change instead and the trained
folder goes to the trash, leaving every adapter and the router as they were.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from bot.errors import DataError
from bot.manifests.add import MIN_PER_LABEL, check_target, scaffold
from bot.manifests.registry import load_task
from bot.manifests.spec import AdapterSpec, check_adapter_name, discover
from bot.manifests.versions import (
    HISTORY_NOTE,
    list_versions,
    record_absent,
    recover_adapters,
    remove,
    retirer,
    rollback,
    score_line,
    to_trash,
)
from bot.routing import changes
from bot.routing.encoder import load_encoder
from bot.training.train import train_adapter, training_rows
from bot.util.fsutil import adapter_lock, swap_in

log = logging.getLogger(__name__)

STAGING = ".staging"


def add_and_train(*, name: str, source, adapters_dir, backbone, kind: str = "classify",
                  text_col: str = "text", label_col: str = "label", prompt_col: str = "prompt",
                  reply_col: str = "reply", description: str = "", force: bool = False,
                  min_per_label: int = MIN_PER_LABEL, strict: bool = False,
                  max_examples: int | None = None, eval_examples: int | None = 400,
                  command: str = "", encoder=None) -> dict:
    """Scaffold, train, refit the router, evaluate; return the change report (also saved).

    Args:
        name, source, kind, text_col, label_col, prompt_col, reply_col, description,
            min_per_label: as for bot.manifests.add.add_adapter.
        force: replace an existing adapter (it is kept as a version: ``bot rollback NAME``).
        strict: refuse the change when an existing route loses more than DROP_POINTS.
        max_examples, eval_examples: as for ``bot train`` (training cap, held-out examples).
        encoder: the router's sentence encoder (None: the bundled one).

    Returns:
        the report dict (bot.routing.changes.build_report) plus ``new_adapter``, ``path``
        (where the markdown was written) and ``applied``.
    """
    check_adapter_name(name, "bot add NAME")
    adapters_dir = Path(adapters_dir)
    folder = adapters_dir / name
    recover_adapters(adapters_dir)
    existed = check_target(folder, force, moved_to="its versions (bot rollback restores it)")
    spec = scaffold(name, Path(source).expanduser(), kind, text_col, label_col, prompt_col,
                    reply_col, description, min_per_label)
    encoder = encoder or load_encoder()
    clock = _Clock()
    with adapter_lock(folder):
        before_specs = discover(adapters_dir)
        states_before = changes.adapter_states(before_specs)
        before_router = changes.served_router(before_specs, adapters_dir, backbone, encoder)
        clock.lap("router_before")
        staging = adapters_dir / STAGING / f"{name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            metrics = train_adapter(spec, backbone, staging, max_examples=max_examples,
                                    eval_examples=eval_examples, command=command)
            clock.lap("training")
            new_spec = AdapterSpec.from_dir(staging)
            after_specs = sorted([s for s in before_specs if s.name != name] + [new_spec],
                                 key=lambda s: s.name)
            after_router = changes.served_router(after_specs, adapters_dir, backbone, encoder)
            clock.lap("router_refit")
            turns = changes.heldout_turns(changes._union(before_specs, after_specs),
                                          [before_router, after_router])
            router_part = {"same": False, **changes.compare(before_router, after_router, turns)}
            clock.lap("routing_the_heldout_turns")
            new_adapter = _score_new(new_spec, backbone, after_router, metrics, eval_examples)
            clock.lap("scoring_the_new_adapter")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        existing = [s.name for s in before_specs if s.name != name]
        drops = changes.regressions(router_part, existing)
        refused = ""
        if strict and drops:
            refused = (f"{', '.join(drops)} lost more than {changes.DROP_POINTS:.0f} point(s); the trained "
                       f"folder is kept in {to_trash(staging, adapters_dir, f'{name}-refused')}")
        elif existed:
            swap_in(staging, folder, retirer(folder, "bot add --force --train"))
        else:
            record_absent(folder, "bot add --train")
            swap_in(staging, folder)
        _cleanup(adapters_dir / STAGING)
    states_after = changes.adapter_states(discover(adapters_dir))  # read back from disk
    report = changes.build_report(action="add", name=name, before_specs=before_specs,
                                  after_specs=before_specs if refused else after_specs,
                                  before_router=before_router, after_router=after_router,
                                  states_before=states_before, states_after=states_after,
                                  router_part=router_part)
    report.update(new_adapter=new_adapter, applied=not refused, seconds=clock.laps)
    if refused:
        report["refused"] = refused
    report["notes"] = [_new_adapter_note(name, new_adapter),
                       f"Versions: {HISTORY_NOTE.format(name=name)}" if not refused else ""]
    report["path"] = str(changes.save(report, adapters_dir))
    return report


def _score_new(spec, backbone, router, metrics: dict, eval_examples: int | None) -> dict:
    """The new adapter's held-out scores from training and, for a classifier, routed."""
    # lazy: bot.eval.evaluate imports sklearn, transformers
    from bot.eval.evaluate import eval_routed

    out = {"kind": spec.kind, "heldout": score_line(metrics), "train_seconds": metrics.get("train_seconds"),
           "examples_seen": metrics.get("examples_seen")}
    if spec.kind != "classify":
        return out
    backbone.drop_adapter(spec.name)
    task = load_task(backbone, spec)
    rows = training_rows(spec)[1].test
    rows = rows[:eval_examples] if eval_examples else rows
    predictions: dict = {}
    task.evaluate(rows, predictions=predictions)
    out["routed"] = eval_routed(router, spec.name, rows, predictions)
    return out


def _new_adapter_note(name: str, new: dict) -> str:
    line = (f"New adapter {name}: held-out {new['heldout']} (right adapter forced); trained "
            f"{new.get('train_seconds') or 0:.0f} s on {new.get('examples_seen')} examples.")
    for view, m in (new.get("routed") or {}).items():
        went = ", ".join(f"{k} {v}" for k, v in m["elsewhere"].items()) or "nowhere else"
        line += (f" Routed end to end ({view}, {m['n']} held-out texts sent as chat turns): "
                 f"{100 * m['routed_accuracy']:.1f} % against {100 * m['oracle_accuracy']:.1f} % with "
                 f"the adapter forced; {100 * m['routed_to_adapter']:.1f} % reached it (the others: {went}).")
    return line


class _Clock:
    """Seconds per phase, for the report (the router refit is meant to take minutes at most)."""

    def __init__(self):
        self._time = time.perf_counter
        self._last = self._time()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = self._time()
        self.laps[name] = round(now - self._last, 1)
        self._last = now


def _cleanup(folder: Path) -> None:
    try:
        folder.rmdir()  # only when empty
    except OSError:
        pass


def remove_route(*, name: str, adapters_dir, backbone=None, strict: bool = False,
                 encoder=None) -> dict:
    """``bot rm NAME``: report what removing the route does, then move it to the trash.

    With ``strict``, a regression of a remaining route refuses the removal. ``bot rollback
    NAME`` brings a removed adapter back.
    """
    adapters_dir = Path(adapters_dir)
    recover_adapters(adapters_dir)
    before_specs = discover(adapters_dir)
    if name not in {s.name for s in before_specs}:
        raise DataError(f"no adapter '{name}' under {adapters_dir} (adapters: "
                        f"{[s.name for s in before_specs]}). Fix: `bot list` shows them")
    after_specs = [s for s in before_specs if s.name != name]
    encoder = encoder or load_encoder()
    states_before = changes.adapter_states(before_specs)
    before_router = changes.served_router(before_specs, adapters_dir, backbone, encoder)
    after_router = changes.served_router(after_specs, adapters_dir, backbone, encoder)
    turns = changes.heldout_turns(before_specs, [before_router, after_router])
    router_part = {"same": False, **changes.compare(before_router, after_router, turns)}
    drops = changes.regressions(router_part, [s.name for s in after_specs])
    refused = ""
    if strict and drops:
        refused = f"{', '.join(drops)} lost more than {changes.DROP_POINTS:.0f} point(s)"
    else:
        moved = remove(adapters_dir, name)
    states_after = changes.adapter_states(discover(adapters_dir))
    report = changes.build_report(action="rm", name=name, before_specs=before_specs,
                                  after_specs=before_specs if refused else after_specs,
                                  before_router=before_router, after_router=after_router,
                                  states_before=states_before, states_after=states_after,
                                  router_part=router_part)
    report["applied"] = not refused
    if refused:
        report["refused"] = refused
    else:
        report["notes"] = [f"Moved {name} to {moved} (nothing deleted); `bot rollback {name}` brings it back."]
    report["path"] = str(changes.save(report, adapters_dir))
    return report


def retrain_report(*, name: str, adapters_dir, backbone=None, strict: bool = False,
                   encoder=None) -> dict | None:
    """After ``bot train NAME`` replaced a trained version: what changed, as a change report.

    The router depends on the manifests only, so when the retrained manifest shapes the same
    router (bot.routing.build.router_key) no turn can move and none is routed again; the
    adapter's own held-out score is compared with the previous version's. With ``strict``, a
    regression (a route, or the adapter's own score, more than DROP_POINTS lower on as many
    examples) rolls the new version back. None when there was no trained previous version.
    """
    adapters_dir = Path(adapters_dir)
    folder = adapters_dir / name
    previous = next(iter(list_versions(folder)), None)
    if previous is None or previous["source"] is None or \
            not (previous["source"] / "adapter_model.safetensors").is_file():
        return None
    old_spec = AdapterSpec.from_dir(previous["source"])
    after_specs = discover(adapters_dir)
    before_specs = [old_spec if s.name == name else s for s in after_specs]
    same = changes.same_routes(before_specs, after_specs, encoder)
    before_router = after_router = None
    if not same:
        encoder = encoder or load_encoder()
        before_router = changes.served_router(before_specs, adapters_dir, backbone, encoder)
        after_router = changes.served_router(after_specs, adapters_dir, backbone, encoder)
    report = changes.build_report(action="train", name=name, before_specs=before_specs,
                                  after_specs=after_specs, before_router=before_router,
                                  after_router=after_router,
                                  states_before=changes.adapter_states(before_specs),
                                  states_after=changes.adapter_states(after_specs), same_router=same)
    own = own_score_drop(previous["metrics"], _read_metrics(folder))
    if own:
        report["warnings"].append(f"{name}'s own held-out score fell: {own}")
    if strict and (report["drops"] or own):
        rollback(adapters_dir, name)
        report["refused"] = "a regression (above); the previous version was put back"
    report["applied"] = not report.get("refused")
    report["notes"] = [f"Versions: {HISTORY_NOTE.format(name=name)}"]
    report["path"] = str(changes.save(report, adapters_dir))
    return report


def _read_metrics(folder: Path) -> dict:
    try:
        return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def own_score_drop(old: dict, new: dict) -> str:
    """How the adapter's own held-out score fell between two metrics.json ('' if it did not).

    Accuracy per view (on the same number of examples) more than DROP_POINTS lower, or a
    held-out perplexity more than 1 % higher."""
    a, b = (m.get("heldout") if isinstance(m, dict) else None for m in (old, new))
    if not isinstance(a, dict) or not isinstance(b, dict):
        return ""
    if "ppl_adapter" in a and "ppl_adapter" in b:
        rise = b["ppl_adapter"] / a["ppl_adapter"] - 1
        return f"perplexity {a['ppl_adapter']:.2f} -> {b['ppl_adapter']:.2f} ({rise:+.1%})" if rise > 0.01 else ""
    falls = []
    for view, m in a.items():
        n = b.get(view)
        if isinstance(m, dict) and isinstance(n, dict) and m.get("n") == n.get("n") and \
                isinstance(m.get("accuracy"), (int, float)) and isinstance(n.get("accuracy"), (int, float)):
            points = 100 * (m["accuracy"] - n["accuracy"])
            if points > changes.DROP_POINTS:
                falls.append(f"{view} {100 * m['accuracy']:.1f} -> {100 * n['accuracy']:.1f} % (n={m['n']})")
    return "; ".join(falls)
