"""`bot eval`: per-task accuracy, transfer against baselines, router quality, learning curves.

Every number comes from the held-out *test* split (bot.manifests.data.split), which training and
router fitting never see. Baselines are trained on the same *train* split.
"""

from __future__ import annotations

import logging
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bot.chat import ChatSession
from bot.errors import BotError, DataError
from bot.eval import metrics as M
from bot.eval.helpful import eval_instructions
from bot.manifests.data import load_user_file
from bot.manifests.registry import load_task
from bot.manifests.spec import AdapterSpec, check_run_values, require_usable, scan
from bot.model.backbone import Backbone
from bot.model.info import machine
from bot.routing import build_router, load_handwritten, route_texts, router_test_set
from bot.routing.abstain import measure
from bot.routing.latency import record_both_isas
from bot.tasks.classify import ClassifyTask
from bot.training.train import training_rows

log = logging.getLogger(__name__)

HELPFUL_PROMPTS = ["How do I boil an egg?", "Give me two tips for sleeping better."]


# ------------------------------------------------------------ zero-shot base
# bot eval without --max-examples: a classify adapter's whole test split when its adapter pass
# takes at most this long here (issue 25: a 100-example sample called a loss a tie), else the
# rows that fit; generation adapters and learning curves keep a fixed count
EVAL_BUDGET_S = 300.0
DEFAULT_GENERATE_EXAMPLES = 400
ZERO_SHOT_MAX_LABELS = 20  # the prompt lists every label; beyond this it is long and rarely meaningful


def zero_shot_skip_reason(labels: list[str], tokenizer, max_labels: int = ZERO_SHOT_MAX_LABELS) -> str | None:
    """Why the zero-shot column cannot be scored for these labels, or None when it can."""
    if len(labels) > max_labels:
        return (f"skipped: {len(labels)} labels (more than {max_labels}); a prompt listing them all "
                "is too long for the small backbone to answer meaningfully")
    firsts = {}
    for lab in labels:
        for first in _first_tokens(tokenizer, lab):
            if firsts.setdefault(first, lab) != lab:
                return (f"skipped: labels '{firsts[first]}' and '{lab}' start with the same token, "
                        "so one forward pass cannot tell them apart")
    return None


def _first_tokens(tokenizer, label: str) -> set[int]:
    return {tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in (label, label.capitalize())}


@torch.inference_mode()
def zero_shot(task: ClassifyTask, texts: list[str], batch_size: int = 8, progress=None) -> list[str]:
    """Ask the bare instruct backbone to pick a label; score each label's first token.

    One forward pass per text: the label whose first token is most likely right after the
    assistant header wins (lower- and capitalised spellings both count). Callers check
    ``zero_shot_skip_reason`` first (too many labels, or labels sharing a first token).
    """
    bb, tok = task.backbone, task.backbone.tokenizer
    options = ", ".join(task.labels)
    firsts = {lab: _first_tokens(tok, lab) for lab in task.labels}
    preds = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        prompts = [tok.apply_chat_template(
            [{"role": "user", "content": f"{t[:1500]}\n\nWhich label fits this text best: {options}? "
                                         "Answer with the label only."}],
            add_generation_prompt=True, tokenize=False) for t in chunk]
        enc = bb.encode(prompts, max_length=512)
        with bb.lock:
            out = bb.forward(enc, None)
        last = enc["attention_mask"].sum(1) - 1
        logp = torch.log_softmax(out.logits[torch.arange(len(chunk)), last].float(), -1)
        for row in logp:
            scores = {lab: max(float(row[i]) for i in ids) for lab, ids in firsts.items()}
            preds.append(max(scores, key=scores.get))
        if progress:
            progress(len(chunk))
    return preds


# --------------------------------------------------------------- per adapter
def eval_classify(task: ClassifyTask, test: list[dict], train: list[dict], *,
                  with_zero_shot: bool = True, checkpoint=None, predictions: dict | None = None) -> dict:
    """Adapter scores first, then TF-IDF, then the (slow) zero-shot column.

    Args:
        with_zero_shot: False skips the zero-shot column (``bot eval --no-zero-shot``).
        checkpoint: called with the result so far after each phase, so an interrupted
            run still has the adapter's own scores on disk.
        predictions: filled with the adapter's predicted labels per view (``eval_routed``).
    """
    labels = task.labels
    truth = [r["label"] for r in test]
    n_views = sum(len(r.get("views", {})) for r in test)
    predictions = {} if predictions is None else predictions
    with tqdm(total=len(test) + n_views, desc=f"eval {task.name}: adapter", unit="ex", file=sys.stderr) as pbar:
        result = task.evaluate(test, progress=pbar.update, predictions=predictions)
    adapter = result.pop("text")
    _interval(adapter, M.right(truth, predictions["text"]))
    out = {"kind": "classify", "status": "ok", "n_test": len(test), "n_train": len(train),
           "adapter": adapter, "views": result, "zero_shot": None, "baseline": None}
    # one TF-IDF fit on the examples the adapter trained on (each text, and each view the
    # manifest trains), scored on the texts and on every view: a fair comparison per view
    views = {v: [r for r in test if v in r.get("views", {})] for v in result}
    if train:
        seen = trained_views(task.spec, train)
        examples = [(r["text"], r["label"]) for r in train] + [
            (r["views"][v], r["label"]) for v in seen for r in train if v in r.get("views", {})]
        out["baseline_trained_on"] = ["text", *seen]
        queries = [r["text"] for r in test] + [r["views"][v] for v, rows in views.items() for r in rows]
        preds = M.tfidf_baseline([t for t, _ in examples], [y for _, y in examples], queries)
        base, rest = preds[:len(test)], preds[len(test):]
        out["baseline"] = M.classification_metrics(truth, base, labels)
        _interval(out["baseline"], M.right(truth, base))
        out["vs_baseline"] = M.paired_difference(M.right(truth, predictions["text"]), M.right(truth, base))
        for view, vtest in views.items():
            vpred, rest = rest[:len(vtest)], rest[len(vtest):]
            vtruth = [r["label"] for r in vtest]
            out.setdefault("views_baseline", {})[view] = M.classification_metrics(vtruth, vpred, labels)
            out.setdefault("views_vs_baseline", {})[view] = M.paired_difference(
                M.right(vtruth, predictions[view]), M.right(vtruth, vpred))
    _set_verdict(out)
    skip = "skipped (--no-zero-shot)" if not with_zero_shot else zero_shot_skip_reason(labels, task.backbone.tokenizer)
    if skip:
        out["zero_shot_note"] = skip
        return out
    if checkpoint:
        checkpoint(out)
    with tqdm(total=len(test), desc=f"eval {task.name}: zero-shot", unit="ex", file=sys.stderr) as zbar:
        zs = zero_shot(task, [r["text"] for r in test], progress=zbar.update)
    out["zero_shot"] = M.classification_metrics(truth, zs, labels)
    _set_verdict(out)
    return out


def trained_views(spec, rows: list[dict]) -> list[str]:
    """The extra views among ``rows`` that ``spec``'s training uses (``view_repeats`` > 0)."""
    return sorted({v for r in rows for v in r.get("views", {}) if spec.train.repeats(v) > 0})


def _interval(metrics: dict, right: list[bool]) -> None:
    """Add the accuracy's 95 % Wilson interval to a classification_metrics dict."""
    interval = M.wilson_interval(sum(right), len(right))
    metrics["interval"] = list(interval) if interval else None


def _set_verdict(out: dict) -> None:
    acc = lambda key: out[key]["accuracy"] if out.get(key) else None  # noqa: E731
    out["verdict"] = M.transfer_verdict(acc("adapter"), acc("baseline"), acc("zero_shot"),
                                        out.get("vs_baseline"))


def budgeted_rows(task, rows: list[dict], budget_s: float = EVAL_BUDGET_S,
                  probe: int = 16) -> tuple[list[dict], str]:
    """The held-out rows to score: all of them when the adapter pass fits ``budget_s`` here.

    Times the adapter on the first ``probe`` rows (each text and its views, as the real
    pass scores them) and keeps as many rows as the budget allows at that rate.
    Returns (rows, a sentence for the report).
    """
    if len(rows) <= probe:
        return rows, f"all {len(rows)} held-out examples"
    head = rows[:probe]
    texts = [r["text"] for r in head] + [v for r in head for v in r.get("views", {}).values()]
    t0 = time.perf_counter()
    task.predict(texts)
    per_row = (time.perf_counter() - t0) / probe
    fits = int(budget_s / per_row) if per_row > 0 else len(rows)
    if fits >= len(rows):
        return rows, f"all {len(rows)} held-out examples (about {per_row * len(rows) / 60:.1f} min here)"
    kept = max(probe, fits)
    return rows[:kept], (f"the first {kept} of {len(rows)} held-out examples: all of them would take "
                         f"about {per_row * len(rows) / 60:.0f} min here, over the "
                         f"{budget_s / 60:.0f}-minute budget (pass --max-examples to choose)")


def eval_generate(task, test: list[dict], bar) -> dict:
    res = task.evaluate(test, progress=bar.update)
    samples = []
    for prompt in [r["prompt"] for r in test[:3]] + HELPFUL_PROMPTS:
        samples.append({"prompt": prompt,
                        "base": task.generate(prompt, adapter=None, max_new_tokens=48),
                        "adapter": task.generate(prompt, max_new_tokens=48)})
    change = res["ppl_change"]
    verdict = ("The adapter fits held-out dialogue replies better than the base model."
               if change < 0 else "The adapter does not lower held-out perplexity: transfer did not help this task.")
    return {"kind": "generate", "status": "ok", "n_test": len(test), "ppl_base": res["ppl_base"],
            "ppl_adapter": res["ppl_adapter"], "samples": samples, "verdict": verdict}


def eval_one(spec: AdapterSpec, bb, max_examples: int | None, data_file: str | None = None,
             loaded: dict | None = None, *, with_zero_shot: bool = True, checkpoint=None,
             kept: dict | None = None) -> dict:
    """Evaluate one adapter; any failure becomes ``{"status": "failed", "error": ...}``.

    Args:
        loaded: when given, the loaded task is stored here by name (the router reuses it).
        with_zero_shot, checkpoint: see ``eval_classify``.
        kept: a classify adapter's test rows and predictions are stored here by name, as
            ``(rows, {view: labels})`` (routed end-to-end accuracy, ``eval_routed``).
    """
    try:
        task = load_task(bb, spec)
        if loaded is not None:
            loaded[spec.name] = task
        if spec.kind == "base":
            return {"kind": "base", "status": "ok", "n_test": 0,
                    "verdict": "The bare backbone answers this route: no adapter to score."}
        if data_file:
            test = user_test_rows(spec, data_file)
            train = training_rows(spec)[1].train if spec.kind == "classify" else []
        else:
            _, splits = training_rows(spec)
            limit = max_examples or (None if spec.kind == "classify" else DEFAULT_GENERATE_EXAMPLES)
            test, train = splits.test[:limit], splits.train
        scored = None
        if spec.kind == "classify" and max_examples is None and not data_file:
            test, scored = budgeted_rows(task, splits.test)
        if spec.kind == "classify":
            predictions: dict = {}
            if kept is not None:
                kept[spec.name] = (test, predictions)
            out = eval_classify(task, test, train, with_zero_shot=with_zero_shot,
                                checkpoint=checkpoint, predictions=predictions)
            out["scored"] = scored or f"{len(test)} held-out examples"
            return out
        with tqdm(total=len(test) * 2, desc=f"eval {spec.name}", unit="ex", file=sys.stderr) as bar:
            return eval_generate(task, test, bar)
    except BotError as err:
        return {"kind": spec.kind, "status": "failed", "error": str(err)}


def user_test_rows(spec: AdapterSpec, path: str) -> list[dict]:
    """Rows from a user's file with the manifest's columns; unknown labels are an error."""
    cols = {k: v for k, v in spec.data.items() if k.endswith("_col")}
    rows = load_user_file(path, spec.kind, **cols)
    if spec.kind == "classify":
        unknown = sorted({r["label"] for r in rows} - set(spec.labels))
        if unknown:
            raise DataError(f"{path}: label(s) {unknown} are not labels of adapter '{spec.name}' "
                            f"({spec.labels}). Fix: relabel those rows or retrain the adapter")
    return rows


# -------------------------------------------------------------------- router
def eval_router(specs: list[AdapterSpec], session=None) -> dict:
    """Router accuracy on the test splits plus the hand-written turns, also per source."""
    router = session.router if session else build_router(specs)
    names = {s.name for s in specs}
    handwritten = load_handwritten(names)
    pairs = router_test_set(specs, exclude=route_texts(router))
    written = set(handwritten)
    sources = ["hand-written" if pair in written else "test split" for pair in pairs]
    truth, pred, fell, choices = [], [], [], []
    second = getattr(router, "second", None)
    asked_before = second.asked if second else 0
    # Embedding in batches is many times faster than one turn at a time; the decisions are the
    # same. Routing *time* is measured apart, without cache hits (latency.route_ms).
    for i, (text, want) in enumerate(tqdm(pairs, desc="eval router", unit="turn", file=sys.stderr)):
        if i % 256 == 0:  # a chunk at a time: the cache keeps the last 1,024 turns
            router.prime([t for t, _ in pairs[i:i + 256]])
        choice = router.route(text)
        choices.append(choice)
        truth.append(want)
        pred.append(choice.adapter)
        fell.append(choice.fallback)
    out = M.router_metrics(truth, pred, fell, labels=[s.name for s in specs],
                           texts=[t for t, _ in pairs])
    out["n_handwritten"] = sum(src == "hand-written" for src in sources)
    # None: the first stage alone (no route adapter fitted for these routes; bot train-router)
    out["second_stage"] = None if second is None else {
        "gate": second.gate, "weight": second.weight,
        "asked_rate": round((second.asked - asked_before) / max(len(pairs), 1), 4)}
    if getattr(router, "second_note", ""):
        out["second_stage_note"] = router.second_note
    rule = getattr(router, "abstain", None)
    if rule is not None:  # how often it would ask back on these turns, and how right the rest is

        out["abstain"] = {"threshold": rule.threshold, "on_by_default": rule.on,
                          "validation": rule.figures, "heldout": measure(rule, choices, truth)}
    by = {}
    for src, want, got in zip(sources, truth, pred):
        key = f"{src}: {want}"
        hit, n = by.get(key, (0, 0))
        by[key] = (hit + (want == got), n + 1)
    out["by_source"] = {k: {"accuracy": h / n, "n": n} for k, (h, n) in sorted(by.items())}
    out["mistakes"] = out.pop("mistakes")  # last, as in earlier reports
    return out


def eval_routed(router, name: str, rows: list[dict], predictions: dict[str, list[str]]) -> dict:
    """Accuracy of one classify task when the router picks the adapter for each held-out text.

    A text counts as right only when the router sends it to ``name`` *and* the adapter's
    label is right; the oracle figure forces the right adapter (the adapter's own accuracy).
    Per view (the text, a BBC headline ...), with where the misrouted texts went and, when an
    abstain threshold is fitted, how often the router would have asked back instead.
    """
    out = {}
    for view, preds in predictions.items():
        subset = rows if view == "text" else [r for r in rows if view in r.get("views", {})]
        texts = [r["text"] if view == "text" else r["views"][view] for r in subset]
        truth = [r["label"] for r in subset]
        choices = router.route_all(texts)
        to_it = [c.adapter == name for c in choices]
        right = [p == y for p, y in zip(preds, truth, strict=True)]
        n = len(subset)
        oracle = sum(right) / n if n else None
        routed = sum(a and r for a, r in zip(to_it, right)) / n if n else None
        row = {"n": n, "oracle_accuracy": oracle, "routed_accuracy": routed,
               "routed_to_adapter": sum(to_it) / n if n else None,
               "cost_points": round(100 * (oracle - routed), 2) if n else None,
               "elsewhere": dict(Counter(c.adapter for c in choices if c.adapter != name).most_common())}
        rule = getattr(router, "abstain", None)
        if rule is not None and n:
            asked = [rule.unsure(c) for c in choices]
            kept = [not a for a in asked]
            n_kept = sum(kept)
            row["abstain"] = {"abstain_rate": sum(asked) / n,
                              "routed_accuracy_rest": (sum(k and a and r for k, a, r in zip(kept, to_it, right))
                                                       / n_kept) if n_kept else None}
        out[view] = row
    return out


def eval_latency(session, n: int = 12) -> dict:
    """Median end-to-end times of classification turns and first streamed chat tokens."""
    turns = load_handwritten(set(session.tasks))
    kinds = {name: task.kind for name, task in session.tasks.items()}
    cls_turns = [t for t, a in turns if kinds.get(a) == "classify"][:n]
    chat_turns = [t for t, a in turns if kinds.get(a) == "generate"][: max(3, n // 2)]
    cls_ms, first_ms, route_ms = [], [], []
    for text in cls_turns:
        session.router.clear_cache()  # eval_router already embedded these turns
        turn = session.fork().send(text)
        route_ms.append(turn.timings["route_ms"])
        if turn.adapter in session.tasks and session.tasks[turn.adapter].kind == "classify":
            cls_ms.append(turn.timings["total_ms"])
    for text in chat_turns:
        session.router.clear_cache()
        s = session.fork()
        s.max_new_tokens = 8
        turn = s.send(f"/chat {text}")
        first_ms.append(turn.timings.get("first_token_ms", float("nan")))
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    return {"classify_turn_ms": med(cls_ms), "first_token_ms": med(first_ms),
            "route_ms": med(route_ms), "n_classify": len(cls_ms), "n_chat": len(first_ms)}


# --------------------------------------------------------------------- curve
def learning_curve(spec: AdapterSpec, bb, sizes: list, max_examples: int | None) -> dict:
    """Short runs on nested subsets; held-out accuracy of adapter and TF-IDF baseline."""
    spec, splits = training_rows(spec)
    pool = list(splits.train)
    random.Random(spec.train.seed).shuffle(pool)  # nested: each subset extends the previous
    test = splits.test[:max_examples or DEFAULT_GENERATE_EXAMPLES]
    truth = [r["label"] for r in test]
    points = {"adapter": [], "tfidf+logreg": []}
    for size in sizes:
        n = len(pool) if size == "ALL" else min(int(size), len(pool))
        subset = pool[:n]
        name = f"{spec.name[:48]}-curve{n}"  # within the 64-character name rule
        cspec = spec.replace(name=name)
        # at least ~40 optimiser steps even on tiny subsets, so small n is not just undertrained
        epochs = max(spec.train.epochs or 1.0, 40 * spec.train.batch_size / max(1, n))
        bb.drop_adapter(name)
        torch.manual_seed(spec.train.seed)
        bb.add_adapter(name, spec.lora.to_peft(model=bb.base))
        task = ClassifyTask(cspec, bb)
        task.fit(subset, epochs, spec.train.seed)
        acc = task.evaluate(test)["text"]["accuracy"]
        bb.drop_adapter(name)
        base = M.tfidf_baseline([r["text"] for r in subset], [r["label"] for r in subset],
                                [r["text"] for r in test])
        points["adapter"].append([n, acc])
        points["tfidf+logreg"].append([n, M.classification_metrics(truth, base, spec.labels)["accuracy"]])
        log.info("  curve %s n=%d: adapter %.3f, tfidf %.3f", spec.name, n, acc,
                 points["tfidf+logreg"][-1][1])
    return {"points": points, "png": f"{spec.name}_learning_curve.png"}


# ------------------------------------------------------------------- a whole run
def run_eval(*, adapters_dir: str | Path, names: list[str] | None = None, backbone: str | None = None,
             data: str | None = None, out: str | Path = "reports", max_examples: int | None = None,
             curve: str | None = None, curve_adapters: str | None = None, no_router: bool = False,
             instructions: str | None = None, no_zero_shot: bool = False, command_line: str = "",
             device: str | None = None, load_in: str | None = None) -> dict:
    """Evaluate adapters, the router and latency; write ``eval.json`` and ``eval.md`` into ``out``.

    Args:
        adapters_dir: folder holding ``<name>/adapter.yaml``.
        names: adapters to evaluate (None or empty: all).
        backbone: backbone name, folder, .gguf file or hub id (None: the embedded default).
        data: a user's CSV/JSONL to evaluate exactly one adapter on, instead of its test split.
        out: report folder.
        max_examples: held-out examples per task (None: a classify adapter's whole test
            split when its adapter pass fits EVAL_BUDGET_S here, else as many as fit; a
            generation adapter's first DEFAULT_GENERATE_EXAMPLES).
        curve: learning-curve sizes, e.g. "32,128,ALL" (None: no curve).
        curve_adapters: comma-separated adapters for ``curve`` (None: every classify adapter).
        no_router: skip the router and latency evaluation.
        instructions: a JSONL of requests with hand-written answers (``prompt``, ``reply``):
            how helpful the chat adapter stays (bot.eval.helpful), with the router's picks.
        no_zero_shot: skip the zero-shot column (the slowest part on a big ``data`` file).
        command_line: recorded in the report's meta.
        device: auto|cpu|cuda|mps (None: $BOT_DEVICE or auto).
        load_in: weight precision auto|fp32|bf16|8bit|4bit (None: $BOT_LOAD_IN or auto).

    Returns:
        the results dict written to ``out/eval.json``.
    """
    from bot.eval.report import write_report  # lazy: bot.eval.report imports matplotlib, sklearn

    t0 = time.perf_counter()
    check_run_values(max_examples=max_examples)
    names = list(names or [])
    specs, broken = scan(adapters_dir)  # a broken folder is reported, never fatal to the others
    if names:
        specs = [s for s in specs if s.name in names]
        broken = {n: e for n, e in broken.items() if n in names}
        missing = sorted(set(names) - {s.name for s in specs} - set(broken))
        if missing:
            raise DataError(f"no adapter folder for {missing} under {adapters_dir}")
    require_usable(specs, broken)
    if data and len(specs) + len(broken) != 1:
        raise DataError("--data evaluates exactly one adapter: bot eval NAME --data FILE")
    bb = Backbone.load(backbone, device=device, load_in=load_in)
    results = {"tasks": {}, "meta": {
        "command": command_line, "backbone": bb.fingerprint, "machine": machine(),
        "device": str(bb.device),
        "date": time.strftime("%Y-%m-%d %H:%M")}}
    tasks, kept = {}, {}
    for name, error in broken.items():
        results["tasks"][name] = {"status": "failed", "error": error}
        _log_line(name, results["tasks"][name])
    for spec in specs:
        def partial(res, name=spec.name):  # the adapter's own scores reach disk before the slow columns
            _log_line(name, res)
            results["tasks"][name] = res
            write_report(results, out, plots=False)

        try:
            results["tasks"][spec.name] = eval_one(spec, bb, max_examples, data, tasks,
                                                   with_zero_shot=not no_zero_shot, checkpoint=partial,
                                                   kept=kept)
        except KeyboardInterrupt:
            if spec.name in results["tasks"]:
                log.warning("interrupted: %s keeps the scores computed so far", out)
            raise
        _log_line(spec.name, results["tasks"][spec.name])
    ok_specs = [s for s in specs if results["tasks"][s.name]["status"] == "ok"]
    if not no_router and not data and len(ok_specs) >= 2:
        session = ChatSession(bb, tasks, build_router(ok_specs, backbone=bb))
        results["router"] = eval_router(ok_specs, session)
        for name, (rows, preds) in kept.items():
            if results["tasks"][name].get("status") == "ok" and preds:
                results["tasks"][name]["routed"] = eval_routed(session.router, name, rows, preds)
        results["latency"] = eval_latency(session)
        _route_timing(results["latency"], adapters_dir)
        _helpfulness(results, session, instructions)
        log.info("router: accuracy %.1f%%, median %s ms/turn", 100 * results["router"]["accuracy"],
                 results["latency"].get("route_ms"))
    if curve:
        sizes = [s if s == "ALL" else int(s) for s in curve.upper().split(",")]
        chosen = set(curve_adapters.split(",")) if curve_adapters else None
        results["curves"] = {s.name: learning_curve(s, bb, sizes, max_examples)
                             for s in ok_specs if s.kind == "classify" and (not chosen or s.name in chosen)}
    results["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(results, out)
    return results


def _route_timing(latency: dict, adapters_dir) -> None:
    """``route_ms``: median over 200 short turns, in a fresh process per CPU setting."""
    latency["route_ms_in_turn"] = latency.pop("route_ms")  # the few turns timed end to end
    try:
        record_both_isas(latency, adapters_dir)
    except Exception as err:  # a child that cannot start must not lose the whole report
        log.warning("routing time per CPU setting not measured: %s", err)


def _helpfulness(results: dict, session, instructions: str | None) -> None:
    """``tasks.<chat>.instructions`` for every generate task, when a file is given."""
    if not instructions:
        return
    rows = load_user_file(instructions, "generate")
    for name, task in session.tasks.items():
        t = results["tasks"][name]
        if task.kind != "generate" or t.get("status") != "ok":
            continue
        change = t["ppl_adapter"] / t["ppl_base"] - 1.0
        t["instructions"] = eval_instructions(session, rows, name, dialogue_ppl_change=change)
        log.info("%s on %d instructions: ppl ratio %.2f, length ratio %.2f", name, len(rows),
                 t["instructions"]["ppl_ratio"], t["instructions"]["length_ratio"] or 0.0)


def all_failed(results: dict) -> bool:
    """True when every evaluated adapter failed (``bot eval`` then exits with 1)."""
    failed = [n for n, t in results["tasks"].items() if t["status"] != "ok"]
    return bool(failed) and len(failed) == len(results["tasks"])


def _log_line(name: str, t: dict) -> None:
    if t["status"] != "ok":
        log.warning("%s: FAILED: %s", name, t["error"])
    elif t["kind"] == "base":
        log.info("%s: the bare backbone (no adapter to score)", name)
    elif t["kind"] == "classify":
        acc = lambda key: f"{100 * t[key]['accuracy']:.1f}%" if t.get(key) else "—"  # noqa: E731
        zs = acc("zero_shot") if t.get("zero_shot") else t.get("zero_shot_note", "running")
        log.info("%s: adapter %s | tfidf %s | zero-shot %s (n=%d)", name, acc("adapter"), acc("baseline"), zs,
                 t["n_test"])
        verdict = (t.get("vs_baseline") or {}).get("verdict")
        if verdict == "loses" or (verdict is None and t.get("baseline")
                                  and t["adapter"]["accuracy"] <= t["baseline"]["accuracy"]):
            log.warning("%s: the adapter LOSES to TF-IDF: %s", name, t["verdict"])
    else:
        log.info("%s: perplexity base %.2f -> adapter %.2f", name, t["ppl_base"], t["ppl_adapter"])
