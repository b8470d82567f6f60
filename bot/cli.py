"""`bot` command line: a thin map from subcommands onto library functions.

The only module that knows argparse: each ``cmd_*`` maps the parsed Namespace onto a library
function's keyword arguments. Library code logs through ``logging``; ``main`` shows the
``bot`` and ``demo`` loggers' INFO and above on stderr, as plain lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bot import settings
from bot.errors import BotError
from bot.model.device import DEVICES, LOAD_IN
from bot.util.assets import default_adapters_dir

# bot.engine.precision.KINDS, spelled out so `bot --help` does not import torch (tests/unit/engine/test_kernels.py checks)
KERNEL_KINDS = ("fp32", "bf16", "w8", "w8f", "w4", "w8h", "bf16h", "w8q", "q8", "q8h")


def _command_line(argv) -> str:
    return "bot " + " ".join(shlex.quote(a) for a in argv)


def _backbone(args):
    # lazy: keeps `bot --help` fast
    from bot.model.backbone import Backbone

    print(f"loading backbone {args.backbone or 'SmolLM2-135M-Instruct (embedded)'} ...", file=sys.stderr)
    # commands without --device/--load-in (export) load on the CPU in float32
    bb = Backbone.load(args.backbone, device=getattr(args, "device", "cpu"),
                       load_in=getattr(args, "load_in", "fp32"))
    print(f"  loaded in {bb.info.seconds:.1f}s{' (first run: converted GGUF into the cache)' if bb.info.converted else ''}",
          file=sys.stderr)
    return bb


# ------------------------------------------------------------------ commands
def cmd_train(args) -> int:
    # lazy: keeps `bot --help` fast
    import torch

    from bot.errors import SpecError
    from bot.manifests.spec import AdapterSpec, check_adapter_name, check_run_values
    from bot.training.parallel import Parallel, launched_by_accelerate
    from bot.training.train import reevaluate_adapter, time_cache, train_adapter
    from bot.util.fsutil import adapter_lock

    # every check before the slow part: values, manifest, and no other run on this adapter
    check_run_values(epochs=args.epochs, max_examples=args.max_examples, eval_examples=args.eval_examples,
                     budget=args.budget)
    check_adapter_name(args.name, "bot train NAME")
    # the training path taken (cached or not, and why) is logged by bot.tasks
    torch.set_num_threads(_training_threads())
    logging.getLogger("bot").info("threads: %d, OMP_WAIT_POLICY=%s", torch.get_num_threads(),
                                  os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP default: spin)"))
    folder = Path(args.adapters_dir) / args.name
    # lazy: keeps `bot --help` fast
    from bot.manifests.versions import recover_adapters

    recover_adapters(args.adapters_dir)  # a save a kill interrupted is repaired first, and said so
    spec = AdapterSpec.from_dir(folder)
    if spec.kind == "base":
        raise SpecError(f"{folder / 'adapter.yaml'}: kind 'base' is the bare backbone: there is "
                        "nothing to train. Fix: use it as it is, or set kind: generate to train a LoRA")
    args.processes = args.processes or max(1, _gpu_count())
    if args.accelerate and args.processes > 1 and not launched_by_accelerate():
        return _relaunch_with_accelerate(args)
    parallel = Parallel.create(use_accelerate=args.accelerate, grad_accum=args.grad_accum,
                               device=args.device)
    args.device = parallel.device or args.device  # accelerate picks each process's GPU
    # only the main process locks: it alone evaluates and saves
    # closing: every process tears its process group down on the way out (Parallel.close)
    with contextlib.closing(parallel), (adapter_lock(folder) if parallel.is_main
                                        else contextlib.nullcontext()):
        bb = _backbone(args)
        if args.time_cache:
            r = time_cache(spec, bb, args.time_cache)
            if "cache_speedup" not in r:
                print(f"{args.name}: no cached path ({r['path_reason']})")
                return 0
            print(f"{args.name}: {r['uncached_epoch_seconds']:.0f} s/epoch uncached, "
                  f"{r['cached_epoch_seconds']:.0f} s/epoch cached (+{r['cache_build_seconds']:.0f} s once "
                  f"to build {r['cache_mb']:.0f} MB): cache_speedup {r['cache_speedup']:.2f}x wall-clock, "
                  f"{r['cache_speedup_cpu']:.2f}x CPU time, over {r['steps_timed']} step pairs on "
                  f"{r['threads']} thread(s)")
            return 0
        if args.eval_only:
            metrics = reevaluate_adapter(folder, bb, args.eval_examples, args.command_line)
            print(_summary(metrics))
            print(f"updated {folder / 'metrics.json'} (training figures kept)")
            return 0
        metrics = train_adapter(spec, bb, folder, epochs=args.epochs, max_examples=args.max_examples,
                                eval_examples=args.eval_examples, command=args.command_line,
                                parallel=parallel, budget_minutes=args.budget)
    if not parallel.is_main:
        return 0
    print(_summary(metrics))
    print(f"saved {folder} (metrics.json has the held-out scores and the exact command)")
    return _retrain_report(args, bb)


def _retrain_report(args, bb) -> int:
    """The change report of a retrained route (previous version kept; --strict rolls back)."""
    # lazy: keeps `bot --help` fast
    from bot.manifests.addflow import retrain_report
    from bot.routing.changes import render

    report = retrain_report(name=args.name, adapters_dir=args.adapters_dir, backbone=bb,
                            strict=args.strict)
    if report is None:
        return 0
    print(render(report))
    print(f"report written to {report['path']}")
    return 1 if report.get("refused") else 0


def cmd_train_router(args) -> int:
    # lazy: keeps `bot --help` fast
    import torch

    from bot.training.second_stage import train_router

    torch.set_num_threads(_training_threads())
    stage = train_router(args.adapters_dir, _backbone(args), command=args.command_line,
                         fit_only=args.fit_only)
    first = stage["first_stage"]
    print(f"validation ({stage['n']} turns, {stage['n_handwritten']} hand-written): first stage "
          f"{100 * first['accuracy']:.1f} %, route adapter alone {100 * stage['adapter_alone']:.1f} %, "
          f"both {100 * stage['accuracy']:.1f} % (gate {stage['gate']:.2f}, weight {stage['weight']:.1f}, "
          f"asked on {100 * stage['asked']:.0f} % of turns)")
    return 0


def _gpu_count() -> int:
    # lazy: keeps `bot --help` fast
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _relaunch_with_accelerate(args) -> int:
    """`bot train --accelerate --processes N`: run this same command under `accelerate launch`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(args.processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "bot.cli", *args.argv]
    print(f"launching {args.processes} processes: {shlex.join(cmd[1:])}", file=sys.stderr)
    return subprocess.run(cmd, check=False).returncode


def _summary(m: dict) -> str:
    h = m["heldout"]
    if m["kind"] == "generate":
        score = f"held-out perplexity {h['ppl_base']:.2f} (base) -> {h['ppl_adapter']:.2f} (adapter), {h['ppl_change']:+.1%}"
    else:
        score = ", ".join(f"{view} accuracy {v['accuracy']:.1%} (n={v['n']})" for view, v in h.items())
    stopped = f" (stopped: {m['stop_reason']})" if m.get("stop_reason") else ""
    return (f"{m['adapter']}: {score}; trained {m['train_seconds']:.0f}s on {m['examples_seen']} "
            f"examples{stopped}")


def cmd_list(args) -> int:
    # lazy: keeps `bot --help` fast
    from bot.manifests.spec import require_usable, scan
    from bot.manifests.versions import list_versions, recover_adapters, score_line

    recover_adapters(args.adapters_dir)  # repairs an interrupted save, and says so
    specs, failed = scan(args.adapters_dir)
    require_usable(specs, failed)  # only when nothing at all can be listed
    entries = sorted([(s.name, s) for s in specs] + list(failed.items()), key=lambda e: e[0])
    for name, item in entries:
        if isinstance(item, str):  # a folder that failed: say why instead of stopping
            print(f"{name:12s} {'FAILED':9s}\n{'':22s}{item}")
            continue
        mpath = item.folder / "metrics.json"
        try:
            state = (_summary(json.loads(mpath.read_text())) if mpath.exists()
                     else "the bare backbone: nothing to train" if item.kind == "base" else "not trained yet")
        except (OSError, ValueError, KeyError, TypeError) as err:
            state = f"{mpath} is unreadable ({type(err).__name__}). Fix: bot train {name} --eval-only"
        print(f"{name:12s} {item.kind:9s} {item.description}\n{'':22s}{state}")
        for i, v in enumerate(list_versions(item.folder), 1):
            what = "did not exist" if v["absent"] else score_line(v["metrics"])
            print(f"{'':22s}previous {i}: {v['date']}: {what}"
                  + (" (bot rollback restores it)" if i == 1 else ""))
    if len(specs) >= 2:
        # lazy: keeps `bot --help` fast
        from bot.routing.second import status

        print(f"{'(router)':12s} {'2nd stage':9s} {status(args.adapters_dir, [s.name for s in specs])}")
    return 0


def cmd_info(args) -> int:
    # lazy: keeps `bot --help` fast
    from bot.model.info import backbone_info

    print(backbone_info(adapters_dir=args.adapters_dir, backbone=args.backbone, device=args.device,
                        load_in=args.load_in))
    return 0


def cmd_add(args) -> int:
    # lazy: keeps `bot --help` fast
    from bot.manifests.add import add_adapter

    if args.train:
        return _add_and_train(args)
    if args.strict:
        raise BotError("--strict refuses a change that makes the router worse, which only "
                       "--train measures. Fix: bot add NAME --from FILE --train --strict")
    path = add_adapter(name=args.name, source=args.source, adapters_dir=args.adapters_dir,
                       kind=args.kind, text_col=args.text_col, label_col=args.label_col,
                       prompt_col=args.prompt_col, reply_col=args.reply_col,
                       description=args.description, force=args.force,
                       min_per_label=args.min_per_label)
    print(f"wrote {path}\nnext: bot train {args.name} && bot eval {args.name}")
    return 0


def _add_and_train(args) -> int:
    # lazy: keeps `bot --help` fast
    import torch

    from bot.manifests.addflow import add_and_train
    from bot.manifests.spec import check_run_values
    from bot.routing.changes import render

    check_values = {"max_examples": args.max_examples, "eval_examples": args.eval_examples}
    check_run_values(**check_values)
    torch.set_num_threads(_training_threads())
    report = add_and_train(name=args.name, source=args.source, adapters_dir=args.adapters_dir,
                           backbone=_backbone(args), kind=args.kind, text_col=args.text_col,
                           label_col=args.label_col, prompt_col=args.prompt_col,
                           reply_col=args.reply_col, description=args.description, force=args.force,
                           min_per_label=args.min_per_label, strict=args.strict,
                           command=args.command_line, **check_values)
    print(render(report))
    print(f"report written to {report['path']}")
    return 1 if report.get("refused") else 0


def cmd_rm(args) -> int:
    # lazy: keeps `bot --help` fast
    from bot.manifests.addflow import remove_route
    from bot.manifests.router_folder import STAGE_FILE, folder_of
    from bot.routing.changes import render

    # the backbone only when the router's second stage (which runs on it) is fitted
    bb = _backbone(args) if (folder_of(args.adapters_dir) / STAGE_FILE).is_file() else None
    report = remove_route(name=args.name, adapters_dir=args.adapters_dir, backbone=bb,
                          strict=args.strict)
    print(render(report))
    print(f"report written to {report['path']}")
    return 1 if report.get("refused") else 0


def cmd_merge(args) -> int:
    # lazy: keeps `bot --help` fast
    from bot.export.merge import check_merge, merge_adapters, parse_sources

    sources = parse_sources(args.sources)
    check_merge(args.adapters_dir, args.name, sources, args.method, args.density)  # before loading
    folder = merge_adapters(_backbone(args), args.adapters_dir, args.name, sources,
                            method=args.method, density=args.density, seed=args.seed)
    print(f"wrote {folder} ({args.method} merge of {args.sources}); serve it with `bot serve` "
          "or load it with /v1/load_lora_adapter")
    return 0


def cmd_rollback(args) -> int:
    # lazy: keeps `bot --help` fast
    from bot.manifests.versions import rollback, score_line

    done = rollback(args.adapters_dir, args.name)
    if done["absent"]:
        print(f"{args.name}: removed again (it did not exist before); the folder is in {done['replaced']}")
    else:
        print(f"{args.name}: restored the version of {done['date']} ({score_line(done['metrics'])})"
              + (f"; the replaced one is in {done['replaced']}" if done["replaced"] else ""))
    print(done["router"])
    print("router first stage: read from $BOT_CACHE/router/ when this route set was built before "
          "(its cache is keyed by the manifests, which are restored), else rebuilt at the next start")
    return 0


def cmd_eval(args) -> int:
    # lazy: keeps `bot --help` fast
    from bot.eval.evaluate import all_failed, run_eval

    if args.only == "router":
        # lazy: keeps `bot --help` fast
        from bot.eval.router_eval import run_router_eval, summary_lines

        results = run_router_eval(adapters_dir=args.adapters_dir, out=args.out, names=args.names,
                                  latency=not args.no_latency, command_line=args.command_line)
        print("\n".join(summary_lines(results["router"], results.get("latency"))))
        print(f"wrote the router section of {Path(args.out) / 'eval.json'} and {Path(args.out) / 'eval.md'}")
        return 0

    results = run_eval(adapters_dir=args.adapters_dir, names=args.names, backbone=args.backbone,
                       data=args.data, out=args.out, max_examples=args.max_examples,
                       curve=args.curve, curve_adapters=args.curve_adapters,
                       no_router=args.no_router, no_zero_shot=args.no_zero_shot,
                       instructions=args.instructions,
                       command_line=args.command_line, device=args.device, load_in=args.load_in)
    out = Path(args.out)
    print(f"wrote {out / 'eval.md'} and {out / 'eval.json'}")
    return 1 if all_failed(results) else 0


def cmd_distill(args) -> int:
    # lazy: keeps `bot --help` fast
    from bot.training.distill import self_distill

    meta = self_distill(_backbone(args), args.out, n=args.n, max_tokens=args.max_tokens,
                        threads=args.threads, seed=args.seed, command=args.command_line)
    print(f"wrote {meta['rows']} replies to {args.out} in {meta['seconds']:.0f} s")
    return 0


def cmd_chat(args) -> int:
    # lazy: keeps `bot --help` fast
    from bot.chat import run_terminal_chat

    return run_terminal_chat(adapters_dir=args.adapters_dir, backbone=args.backbone,
                             device=args.device, load_in=args.load_in, engine=args.engine)


def cmd_bench(args) -> int:
    if args.serve:
        # lazy: keeps `bot --help` fast
        from bot.serve.load_bench import run_serve_bench

        # the benchmark's child processes (and their `bot serve`) load where this one would
        os.environ.update(BOT_DEVICE=args.device, BOT_LOAD_IN=args.load_in)

        result = run_serve_bench(adapters_dir=args.adapters_dir, backbone=args.backbone,
                                 out_dir=Path(args.out).parent, n_requests=args.requests,
                                 max_tokens=args.tokens, command_line=args.command_line,
                                 isas=_isas(args.isa), levels=args.levels, against=args.against,
                                 traffic=_traffic(args.traffic))
        figures = ", ".join(f"{k} {result[k]}" for k in result["targets"])
        print(f"{figures} ({result['top_level_isa']}) -> {Path(args.out).parent / 'serve.md'}")
        return 0
    if args.against:
        raise SystemExit("bot bench: --against llama-server compares servers; add --serve")
    # lazy: keeps `bot --help` fast
    from bot.eval.bench import run_bench

    print(run_bench(adapters_dir=args.adapters_dir, backbone=args.backbone, out=args.out,
                    tokens=args.tokens, command_line=args.command_line, isas=_isas(args.isa),
                    llamacpp_path=args.llamacpp, llamacpp_avx2_path=args.llamacpp_avx2,
                    all_kinds=args.all_kernels, refresh_kernels=args.refresh_kernels,
                    threads=args.threads, quality_rows=args.quality_rows, device=args.device,
                    load_in=args.load_in))
    return 0


def _isas(isa: str) -> tuple[str, ...]:
    return ("native", "avx2") if isa == "both" else (isa,)


def _traffic(traffic: str) -> tuple[str, ...]:
    return ("mixed", "single") if traffic == "both" else (traffic,)


def _levels(text: str) -> tuple[int, ...]:
    """``--levels 1,8``: concurrent clients per level, whole numbers >= 1, each once."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated client counts "
                                         "such as 1,4,8,16 (whole numbers >= 1)")
    levels = tuple(dict.fromkeys(int(p) for p in parts))
    return levels


def cmd_serve(args) -> int:
    # lazy: keeps `bot --help` fast
    from bot.serve.limits import Limits
    from bot.serve.server import serve

    limits = Limits(max_body_bytes=args.max_body_bytes, max_input_chars=args.max_input_chars,
                    max_classify_inputs=args.max_classify_inputs,
                    header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                    keep_alive_timeout=args.keep_alive_timeout)
    return serve(_backbone(args), args.adapters_dir, host=args.host, port=args.port,
                 api_key=args.api_key or None, precision=args.precision,
                 max_batch=args.max_batch, max_queue=args.max_queue, max_len=args.max_model_len,
                 with_router=not args.no_router, limits=limits)


def cmd_export(args) -> int:
    # lazy: keeps `bot --help` fast
    from bot.export.vllm import check_destination, export

    check_destination(args.to, args.force)  # before the backbone loads: refusals come at once
    bb = _backbone(args)
    manifest = export(args.names, args.to, backbone=bb, adapters_dir=args.adapters_dir,
                      target=args.target, max_lora_rank=args.max_lora_rank, force=args.force)
    kinds = [*(f"{n} (generate)" for n in manifest["generate"]),
             *(f"{n} (classify)" for n in manifest["classify"])]
    print(f"wrote {args.to}: base + {', '.join(kinds)}; --max-lora-rank {manifest['max_lora_rank']}\n"
          f"next: read {Path(args.to) / 'README.md'} for the vllm serve commands and client code")
    return 0


def cmd_demo(args) -> int:
    # lazy: keeps `bot --help` fast
    from demo.app import launch

    return launch(adapters_dir=args.adapters_dir, backbone=args.backbone, host=args.host,
                  port=args.port, share=args.share, device=args.device, load_in=args.load_in)


# -------------------------------------------------------------------- parser
# figures: metrics.json of each adapter and reports/bench.md (2-core x86_64 CPU, bf16 autocast)
TRAIN_EPILOG = """\
classify training stops when the validation score stops improving
(train.patience checks in a row, 3 checks per epoch; the best checkpoint is
kept) or when --budget is spent (train.budget_minutes, default 20 min on 2
cores, cache pass included); the learning-rate schedule is fitted to the
budget. train.epochs is the most passes; null (bot add's default) plans
2 + labels/10 passes, at least ~3,000 examples, at most 10. texts longer than
train.max_length are read whole as up to train.max_windows windows.
what the default adapters take on the 2-core reference machine (each
metrics.json holds its command): sentiment (LoRA on layers 18-29, 1 epoch)
29.8 min with --budget 35 on a shared machine (cache 7 min, 937 MB); topic
(layers 24-29, 3 epochs, whole articles as up to 3 windows of 512 tokens,
headlines twice) 61 min with --budget 70 alone (cache 12 min, 1.9 GB); chat
6.5 min. the frozen-layer cache is built once per distinct training prompt;
then a topic epoch costs 0.48x of the uncached wall time (cache_speedup
2.10x, 512-token windows) and a sentiment epoch 0.71x
(1.41x, measured for layers 18-29): the fewer layers carry LoRA, the more the
cache saves.
the cache holds 4 bytes x hidden size x distinct training tokens: topic
1,917 MB, sentiment 937 MB. up to $BOT_TRAIN_CACHE_MB (default 1024) it stays
in memory, above that it is a temporary file under $BOT_CACHE/train-states
(deleted after).
training threads sleep while they wait (OMP_WAIT_POLICY=PASSIVE) and use the
cores other jobs leave free at the start (BOT_TRAIN_THREADS overrides).
"""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return value


def _seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _precision(text: str) -> str:
    """``auto``, a kernel, or ``small,large`` (bot.engine.tuning.parse, without importing torch)."""
    parts = [p.strip().lower() for p in text.split(",")]
    if parts == ["auto"] or (len(parts) in (1, 2) and all(p in KERNEL_KINDS for p in parts)):
        return ",".join(parts)
    raise argparse.ArgumentTypeError(f"'{text}' is not a kernel: use auto, one of "
                                     f"{', '.join(KERNEL_KINDS)}, or SMALL,LARGE (e.g. w8,bf16)")


def _curve_sizes(text: str) -> str:
    """Check ``--curve`` here, so a typo is a usage message rather than a traceback."""
    parts = [p.strip().upper() for p in text.split(",")]
    if not parts or not all(p == "ALL" or (p.isdigit() and int(p) > 0) for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive sizes or ALL, e.g. 32,128,ALL")
    return ",".join(parts)


# ------------------------------------------------------------------ the CLI table
def _flags_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--epochs", type=float,
                   help="override train.epochs, the most passes (classify training stops earlier once "
                        "the validation score stops improving: train.patience checks)")
    p.add_argument("--budget", type=float, metavar="MINUTES",
                   help="classify: wall-clock minutes training may take (default train.budget_minutes, "
                        "20); the learning-rate schedule is fitted to it and the ETA shown against it")
    p.add_argument("--max-examples", type=int, help="cap the training examples (quick runs; the cap is printed)")
    p.add_argument("--eval-examples", type=int, default=1000, help="held-out examples scored (default 1000)")
    p.add_argument("--eval-only", action="store_true",
                   help="do not train: re-score the saved adapter on its held-out split and update metrics.json")
    p.add_argument("--accelerate", action="store_true",
                   help="train data-parallel through accelerate (same as `accelerate launch -m bot train NAME`)")
    p.add_argument("--processes", type=int,
                   help="processes for --accelerate (default: one per CUDA GPU, else 1)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step in each process (train.batch_size stays the "
                        "examples per step)")
    p.add_argument("--strict", action="store_true",
                   help="when the retrained version makes a route or its own held-out score more than "
                        "1 point worse, put the previous version back")
    p.add_argument("--time-cache", type=_positive, metavar="STEPS",
                   help="do not train: time STEPS steps with and without cached frozen layers, side by side, "
                        "and record cache_speedup in metrics.json")


def _flags_train_router(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fit-only", action="store_true",
                   help="keep the trained route adapter; only refit its gate and weight")


def _flags_add(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--from", dest="source", required=True, help="CSV, TSV, JSONL or JSON file")
    p.add_argument("--kind", choices=["classify", "generate"], default="classify")
    p.add_argument("--text-col", default="text")
    p.add_argument("--label-col", default="label")
    p.add_argument("--prompt-col", default="prompt")
    p.add_argument("--reply-col", default="reply")
    p.add_argument("--description", default="")
    p.add_argument("--force", action="store_true",
                   help="replace an existing adapter: its folder is moved to ADAPTERS_DIR/.trash/NAME-<time>/")
    p.add_argument("--min-per-label", type=_positive, default=5,
                   help="refuse labels with fewer examples (default 5; 1 keeps every label, rare ones are learned poorly)")
    p.add_argument("--train", action="store_true",
                   help="also train it (bot train's defaults), refit the router for the new route set, "
                        "score it and print one report: every route's held-out accuracy before and "
                        "after, the turns that moved, each adapter's score and weight digests")
    p.add_argument("--strict", action="store_true",
                   help="with --train: refuse the change (nothing is changed) when an existing route "
                        "loses more than 1 point")
    p.add_argument("--max-examples", type=int, help="with --train: cap the training examples")
    p.add_argument("--eval-examples", type=int, default=400,
                   help="with --train: held-out examples scored (default 400)")


def _flags_rm(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--strict", action="store_true",
                   help="refuse (nothing is moved) when a remaining route loses more than 1 point")


def _flags_merge(p: argparse.ArgumentParser) -> None:
    # lazy: keeps `bot --help` fast
    from bot.export.merge import METHODS

    p.add_argument("name", help="the new adapter's name (a new folder in --adapters-dir)")
    p.add_argument("--from", dest="sources", required=True, metavar="A:W,B:W",
                   help="generation adapters and their weights, e.g. chat:0.5,mine:0.5")
    p.add_argument("--method", choices=METHODS, default="linear",
                   help="peft's combination: linear (same ranks), cat (exactly the served "
                        "mixture), ties, dare_ties (default: %(default)s)")
    p.add_argument("--density", type=float, default=0.5,
                   help="ties/dare_ties: fraction of values kept (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="dare_ties: its random drop (default 0)")


def _flags_rollback(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")


def _flags_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help="adapters to evaluate (default: all)")
    p.add_argument("--data", help="evaluate one adapter on your own CSV/JSONL (same columns as its manifest)")
    p.add_argument("--out", default="reports", help="output folder (default: reports/)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="held-out examples per task (default: a classify adapter's whole test "
                        "split when scoring it takes under 5 minutes here, else as many as fit, "
                        "said in the report; 400 for a generation adapter)")
    p.add_argument("--curve", type=_curve_sizes, help="learning curve sizes, e.g. 32,128,512,ALL")
    p.add_argument("--curve-adapters", help="comma-separated adapters for --curve (default: every classify adapter)")
    p.add_argument("--no-router", action="store_true", help="skip the router evaluation")
    p.add_argument("--only", choices=["router"],
                   help="router: only the router's held-out accuracy and routing time (about a minute; "
                   "no backbone), merged into an existing OUT/eval.json")
    p.add_argument("--no-latency", action="store_true",
                   help="with --only router: skip the routing-time measurement")
    p.add_argument("--instructions", help="JSONL of requests with hand-written answers (prompt, reply): "
                   "how helpful the chat adapter stays (the repository has one under tests/)")
    p.add_argument("--no-zero-shot", action="store_true",
                   help="skip the zero-shot column (the slowest part on a big --data file)")


def _flags_distill(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="adapters/chat/self_distill.jsonl")
    p.add_argument("--n", type=int, default=1200, help="prompts to answer (default 1200)")
    p.add_argument("--max-tokens", type=int, default=120)
    p.add_argument("--threads", type=int, default=12, help="requests in flight at once")
    p.add_argument("--seed", type=int, default=0)


def _flags_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["torch", "llamacpp"], default=None,
                   help="what generates replies: the PyTorch fast path (default) or llama.cpp "
                        "(optional .[llamacpp] extra, one conversation at a time; falls back to "
                        "PyTorch with a message when it cannot run). Default: $BOT_ENGINE, else torch")


def _flags_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="reports/bench.md")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--serve", action="store_true",
                   help="benchmark `bot serve` instead: 1/4/8/16 concurrent clients vs one by one, "
                        "on this CPU and with AVX2 only -> reports/serve.md and serve.json")
    p.add_argument("--requests", type=_positive, default=32, help="requests per level (--serve)")
    p.add_argument("--against", choices=["llama-server"], default=None,
                   help="--serve: drive llama.cpp's llama-server with the same load, one server at "
                        "a time, and report the ratios (build it first: "
                        "bash scripts/build-llama-server.sh)")
    p.add_argument("--levels", type=_levels, default=(1, 4, 8, 16), metavar="N,N,...",
                   help="--serve: concurrent clients of each level (default 1,4,8,16)")
    p.add_argument("--traffic", choices=["both", "mixed", "single"], default="both",
                   help="--serve --against: mixed (base, chat and a second adapter in turn), "
                        "single (every request on chat) or both (default)")
    p.add_argument("--isa", choices=["both", "native", "avx2"], default="both",
                   help="CPU settings to measure: the machine as it is, PyTorch limited to AVX2, or both")
    p.add_argument("--llamacpp", default=settings.get("BOT_LLAMACPP_PATH"), metavar="SITE_PACKAGES",
                   help="a site-packages folder holding llama_cpp, if not importable here "
                        "(default $BOT_LLAMACPP_PATH); adds llama.cpp rows")
    p.add_argument("--llamacpp-avx2", default=None, metavar="SITE_PACKAGES",
                   help="llama_cpp built for AVX2 only, for the avx2 rows (default: --llamacpp)")
    p.add_argument("--all-kernels", action="store_true",
                   help="time and score every kernel end to end, not only fp32, w8 and the chosen one")
    p.add_argument("--refresh-kernels", action="store_true",
                   help="measure the kernel choice again instead of reusing $BOT_CACHE/kernels.json")
    p.add_argument("--threads", type=_positive, default=None,
                   help="threads for torch and llama.cpp in every row (default: all cores); "
                        "1 gives steadier ratios on a machine shared with other jobs")
    p.add_argument("--quality-rows", type=_positive, default=60,
                   help="held-out dialogue pairs scored for the perplexity check (default 60)")


def _flags_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    p.add_argument("--port", type=int, default=settings.get_int("BOT_SERVE_PORT"))
    p.add_argument("--api-key", default=settings.get("BOT_API_KEY"),
                   help="require 'Authorization: Bearer KEY'; enables adapter loading and "
                        "unloading over the API. A key on the command line shows in `ps` to "
                        "every user of the machine: set BOT_API_KEY instead to keep it out")
    p.add_argument("--max-batch", type=_positive, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=_positive, default=64,
                   help="requests waiting or running before new ones get 429")
    p.add_argument("--max-model-len", type=_positive, default=2048,
                   help="context limit per request: prompt + max_tokens")
    p.add_argument("--precision", type=_precision, default="auto",
                   help="base weights while serving: auto (the kernels measured fastest on this CPU "
                        "for small and large steps, cached, see `bot info`), one of "
                        f"{', '.join(KERNEL_KINDS)}, or SMALL,LARGE (e.g. w8,bf16); fp32 is exact")
    p.add_argument("--no-router", action="store_true", help="do not fit the router (no model 'auto')")
    p.add_argument("--max-body-bytes", type=_positive, default=4 * 1024 * 1024,
                   help="larger request bodies get 413 before they are read (default 4 MiB)")
    p.add_argument("--max-input-chars", type=_positive, default=None,
                   help="characters of one chat request's messages (and of each classify text), "
                        "checked before tokenizing (default: 32 per token of --max-model-len)")
    p.add_argument("--max-classify-inputs", type=_positive, default=256,
                   help="texts per /v1/classify request (default 256)")
    p.add_argument("--header-timeout", type=_seconds, default=10.0,
                   help="seconds a client may take to send a request's headers (default 10)")
    p.add_argument("--body-timeout", type=_seconds, default=30.0,
                   help="seconds a client may take to send a request's body (default 30)")
    p.add_argument("--keep-alive-timeout", type=_positive, default=5,
                   help="seconds an idle keep-alive connection stays open (default 5)")


def _flags_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="+", help="adapters to export")
    p.add_argument("--to", required=True, help="output folder (replaced atomically)")
    p.add_argument("--for", dest="target", choices=["vllm"], default="vllm", help="engine (default vllm)")
    p.add_argument("--max-lora-rank", type=int,
                   help="vLLM's --max-lora-rank (1, 8, 16, ..., 512; default: the smallest that fits)")
    p.add_argument("--force", action="store_true",
                   help="--to may hold files no export wrote: move them to .trash/ beside it "
                        "(otherwise refused)")


def _flags_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=settings.get_int("BOT_PORT"))
    p.add_argument("--share", action="store_true", help="ask Gradio for a public share link (off by default)")
    return p


@dataclass(frozen=True)
class Command:
    """One subcommand: what runs, its one-line help, the shared flag groups it takes
    (``common``: --backbone/--adapters-dir; ``model``: --device/--load-in), its own flags."""

    func: Callable[[argparse.Namespace], int]
    help: str
    parents: tuple[str, ...]
    flags: Callable[[argparse.ArgumentParser], None] | None = None
    extra: dict = field(default_factory=dict)  # more add_parser() arguments (description, epilog)


# name -> Command: the whole command line, in the order `bot --help` lists it
COMMANDS: dict[str, Command] = {
    "train": Command(cmd_train, "train one adapter from its adapter.yaml", ("common", "model"),
                     _flags_train, extra=dict(epilog=TRAIN_EPILOG,
                                              formatter_class=argparse.RawDescriptionHelpFormatter)),
    "train-router": Command(
        cmd_train_router, "train the router's second stage (a route adapter) and fit when to ask it",
        ("common", "model"), _flags_train_router,
        extra=dict(description="Train ADAPTERS_DIR/.router/router, a classify adapter whose labels "
                               "are the routes, on the routes' training texts; then choose on "
                               "validation when the router asks it (stage.json). Rerun after adding "
                               "or removing an adapter: until then the router uses its first stage "
                               "alone. About 15 min on 2 CPU cores for the four default routes.")),
    "add": Command(cmd_add, "scaffold a new adapter from a CSV/JSONL file (--train: train it, refit the router "
                 "and report what changed)", ("common", "model"), _flags_add),
    "rm": Command(cmd_rm, "move an adapter to ADAPTERS_DIR/.trash, with a report of what it does to routing", ("common", "model"), _flags_rm),
    "merge": Command(cmd_merge, "write a new adapter folder merging others with weights (peft's "
                     "add_weighted_adapter: linear, cat, ties, dare_ties)", ("common", "model"),
                     _flags_merge),
    "rollback": Command(cmd_rollback, "restore the previous version of an adapter (bot list shows them)", ("common",), _flags_rollback),
    "eval": Command(cmd_eval, "per-task accuracy, router quality, transfer report", ("common", "model"), _flags_eval),
    "distill": Command(cmd_distill, "write the base model's replies to TREC questions (chat self-distillation data)", ("common", "model"), _flags_distill),
    "chat": Command(cmd_chat, "chat in the terminal", ("common", "model"), _flags_chat),
    "list": Command(cmd_list, "list adapters and their held-out scores", ("common",)),
    "info": Command(cmd_info, "backbone, parameters, load time, adapters, memory", ("common", "model")),
    "bench": Command(cmd_bench, "speed benchmark; writes a markdown table", ("common", "model"), _flags_bench),
    "serve": Command(cmd_serve, "OpenAI-compatible API: many clients and adapters share batched decoding", ("common", "model"), _flags_serve),
    "export": Command(cmd_export, "write adapters + backbone for vLLM", ("common",), _flags_export),
    "demo": Command(cmd_demo, "launch the Gradio demo on 127.0.0.1:7860", ("common", "model"), _flags_demo),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bot", description="One backbone, many LoRA adapters, a router and a demo.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--backbone", default=settings.get("BOT_BACKBONE"),
                        help="model folder, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    common.add_argument("--adapters-dir", default=str(default_adapters_dir()),
                        help="folder holding <name>/adapter.yaml (default: %(default)s)")
    model = argparse.ArgumentParser(add_help=False)  # commands that load the backbone
    model.add_argument("--device", choices=DEVICES, default=settings.get("BOT_DEVICE"),
                       help="where the backbone runs (default auto: CUDA, then MPS, then CPU)")
    model.add_argument("--load-in", choices=LOAD_IN, default=settings.get("BOT_LOAD_IN"),
                       help="weight precision (default auto: fp32 on CPU/MPS, bf16 on CUDA); "
                            "8bit/4bit quantize with bitsandbytes and need CUDA")
    groups = {"common": common, "model": model}
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        parser = sub.add_parser(name, parents=[groups[g] for g in command.parents],
                                help=command.help, **command.extra)
        if command.flags is not None:
            command.flags(parser)
        parser.set_defaults(func=command.func)
    return p

def _training_threads() -> int:
    """Threads for a training run: ``$BOT_TRAIN_THREADS``, else the cores other jobs leave free.

    Threads time-sliced against other busy processes wait on each other at every
    parallel op, so a training run takes only the cores that are busy *now* leave
    idle (at least one); see ``_busy_cores``.
    """
    cores = os.cpu_count() or 1
    wanted = settings.get("BOT_TRAIN_THREADS") or ""
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise BotError(f"BOT_TRAIN_THREADS={wanted!r} is not a whole number >= 1. "
                           "Fix: set it to a thread count, e.g. 2, or unset it")
        return int(wanted)
    free = max(1, min(cores, cores - int(_busy_cores() + 0.5)))
    # processes started together by accelerate/torchrun share the free cores
    siblings = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, free // int(siblings)) if siblings.isdigit() and int(siblings) > 1 else free


def _cpu_times() -> tuple[int, int] | None:
    """(all, idle) jiffies of the whole machine from /proc/stat, or None where it cannot be read."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError, IndexError):
        return None


def _busy_cores(window: float = 1.0) -> float:
    """Cores kept busy over the next ``window`` seconds (Linux), else the 1-minute load average.

    The load average lags: right after one training run ended it still read 1.3 on a
    2-core machine, so the next run (``make train-defaults`` trains one adapter after
    another) took a single thread for its whole length, about twice the time.
    """
    before = _cpu_times()
    if before is not None:
        time.sleep(window)
        after = _cpu_times()
        if after is not None and after[0] > before[0]:
            spent, idle = after[0] - before[0], after[1] - before[1]
            return (spent - idle) / spent * (os.cpu_count() or 1)
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def _passive_omp_for_training(argv: list[str]) -> None:
    """Re-run this ``bot train`` once with ``OMP_WAIT_POLICY=PASSIVE`` (unless the user set it).

    Idle OpenMP threads spin by default; with another process busy on one of two cores,
    LoRA steps took 11-14 s instead of 2.6-3.6 s until waiting threads slept instead.
    libgomp reads the variable once, when torch loads (``import bot`` loads it), hence
    the re-exec. Other commands keep the default policy: spinning cuts inference latency.
    """
    if "OMP_WAIT_POLICY" in os.environ or os.name != "posix":
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    root = str(Path(__file__).resolve().parent.parent)  # the same bot package, whatever the cwd
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "bot.cli", *argv], env)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests and shells may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Show the library's log lines on stderr as plain text (what ``bot`` printed before)."""
    for name in ("bot", "demo"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, _StderrHandler)]
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None  # only a real command line may re-exec (tests call main(argv))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if from_shell and args.cmd == "train":
        _passive_omp_for_training(argv)
    args.command_line = _command_line(argv)
    args.argv = argv
    setup_logging()
    try:
        return args.func(args)
    except BotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path the user gave cannot be read or written
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was overwritten", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
