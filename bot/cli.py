"""`bot` command line: a thin map from subcommands onto library functions."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from .assets import default_adapters_dir
from .errors import BotError


def _command_line(argv) -> str:
    return "bot " + " ".join(shlex.quote(a) for a in argv)


def _backbone(args):
    from .backbone import Backbone

    print(f"loading backbone {args.backbone or 'SmolLM2-135M-Instruct (embedded)'} ...", file=sys.stderr)
    bb = Backbone.load(args.backbone)
    print(f"  loaded in {bb.info.seconds:.1f}s{' (first run: converted GGUF into the cache)' if bb.info.converted else ''}",
          file=sys.stderr)
    return bb


# ------------------------------------------------------------------ commands
def cmd_train(args) -> int:
    import logging

    import torch

    from .spec import AdapterSpec
    from .train import reevaluate_adapter, train_adapter

    # the training path taken (cached or not, and why) is logged by bot.tasks
    logger = logging.getLogger("bot")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler(sys.stderr))
    torch.set_num_threads(_training_threads())
    logger.info("threads: %d, OMP_WAIT_POLICY=%s", torch.get_num_threads(),
                os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP default: spin)"))
    folder = Path(args.adapters_dir) / args.name
    spec = AdapterSpec.from_dir(folder)
    bb = _backbone(args)
    if args.time_cache:
        from .train import time_cache

        r = time_cache(spec, bb, args.time_cache)
        if "cache_speedup" not in r:
            print(f"{args.name}: no cached path ({r['path_reason']})")
            return 0
        print(f"{args.name}: {r['uncached_epoch_seconds']:.0f} s/epoch uncached, {r['cached_epoch_seconds']:.0f} s/epoch "
              f"cached (+{r['cache_build_seconds']:.0f} s once to build {r['cache_mb']:.0f} MB): "
              f"cache_speedup {r['cache_speedup']:.2f}x wall-clock, {r['cache_speedup_cpu']:.2f}x CPU time, "
              f"over {r['steps_timed']} step pairs on {r['threads']} thread(s)")
        return 0
    if args.eval_only:
        metrics = reevaluate_adapter(folder, bb, args.eval_examples, args.command_line)
        print(_summary(metrics))
        print(f"updated {folder / 'metrics.json'} (training figures kept)")
        return 0
    metrics = train_adapter(spec, bb, folder, epochs=args.epochs, max_examples=args.max_examples,
                            eval_examples=args.eval_examples, command=args.command_line)
    print(_summary(metrics))
    print(f"saved {folder} (metrics.json has the held-out scores and the exact command)")
    return 0


def _summary(m: dict) -> str:
    h = m["heldout"]
    if m["kind"] == "generate":
        score = f"held-out perplexity {h['ppl_base']:.2f} (base) -> {h['ppl_adapter']:.2f} (adapter), {h['ppl_change']:+.1%}"
    else:
        score = ", ".join(f"{view} accuracy {v['accuracy']:.1%} (n={v['n']})" for view, v in h.items())
    return f"{m['adapter']}: {score}; trained {m['train_seconds']:.0f}s on {m['examples_seen']} examples"


def cmd_list(args) -> int:
    import json

    from .spec import discover

    for spec in discover(args.adapters_dir):
        mpath = spec.folder / "metrics.json"
        state = _summary(json.loads(mpath.read_text())) if mpath.exists() else "not trained yet"
        print(f"{spec.name:12s} {spec.kind:9s} {spec.description}\n{'':22s}{state}")
    return 0


def cmd_info(args) -> int:
    from .info import backbone_info

    print(backbone_info(args))
    return 0


def cmd_add(args) -> int:
    from .add import add_adapter

    path = add_adapter(args)
    print(f"wrote {path}\nnext: bot train {args.name} && bot eval {args.name}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import run_eval

    return run_eval(args)


def cmd_chat(args) -> int:
    from .chat import run_terminal_chat

    return run_terminal_chat(args)


def cmd_bench(args) -> int:
    from .bench import run_bench

    return run_bench(args)


def cmd_demo(args) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from demo.app import launch

    return launch(args)


# -------------------------------------------------------------------- parser
# figures: metrics.json of each adapter and reports/bench.md (2-core x86_64 CPU, bf16 autocast)
TRAIN_EPILOG = """\
time on the 2-core reference machine, idle, without the frozen-layer cache:
  topic 14 min (1.5 epochs), sentiment 16 min (1 epoch), chat 13 min.
classify adapters cache the hidden states below their first LoRA layer once
per training text (about 0.4 uncached epoch for topic, 0.2 for sentiment), then
each epoch takes 0.64x (topic) / 0.77x (sentiment) of the uncached CPU time.
the cache holds 4 bytes x hidden size x training tokens: topic 895 MB,
sentiment 928 MB. up to $BOT_TRAIN_CACHE_MB (default 1024) it stays in memory,
above that it is a temporary file under $BOT_CACHE/train-states (deleted after).
training threads sleep while they wait (OMP_WAIT_POLICY=PASSIVE) and use the
cores other jobs leave free (BOT_TRAIN_THREADS overrides).
"""

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bot", description="One backbone, many LoRA adapters, a router and a demo.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--backbone", default=os.environ.get("BOT_BACKBONE"),
                        help="model folder, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    common.add_argument("--adapters-dir", default=str(default_adapters_dir()),
                        help="folder holding <name>/adapter.yaml (default: %(default)s)")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    t = sub.add_parser("train", parents=[common], help="train one adapter from its adapter.yaml",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("name")
    t.add_argument("--epochs", type=float, help="override train.epochs")
    t.add_argument("--max-examples", type=int, help="cap the training examples (quick runs)")
    t.add_argument("--eval-examples", type=int, default=1000, help="held-out examples scored (default 1000)")
    t.add_argument("--eval-only", action="store_true",
                   help="do not train: re-score the saved adapter on its held-out split and update metrics.json")
    t.add_argument("--time-cache", type=int, metavar="STEPS",
                   help="do not train: time STEPS steps with and without cached frozen layers, side by side, "
                        "and record cache_speedup in metrics.json")
    t.set_defaults(func=cmd_train)

    a = sub.add_parser("add", parents=[common], help="scaffold a new adapter from a CSV/JSONL file")
    a.add_argument("name")
    a.add_argument("--from", dest="source", required=True, help="CSV, TSV, JSONL or JSON file")
    a.add_argument("--kind", choices=["classify", "generate"], default="classify")
    a.add_argument("--text-col", default="text")
    a.add_argument("--label-col", default="label")
    a.add_argument("--prompt-col", default="prompt")
    a.add_argument("--reply-col", default="reply")
    a.add_argument("--description", default="")
    a.add_argument("--force", action="store_true", help="overwrite an existing adapter.yaml")
    a.add_argument("--min-per-label", type=int, default=5,
                   help="refuse labels with fewer examples (default 5; 1 keeps every label, rare ones are learned poorly)")
    a.set_defaults(func=cmd_add)

    e = sub.add_parser("eval", parents=[common], help="per-task accuracy, router quality, transfer report")
    e.add_argument("names", nargs="*", help="adapters to evaluate (default: all)")
    e.add_argument("--data", help="evaluate one adapter on your own CSV/JSONL (same columns as its manifest)")
    e.add_argument("--out", default="reports", help="output folder (default: reports/)")
    e.add_argument("--max-examples", type=int, default=400, help="held-out examples per task (default 400)")
    e.add_argument("--curve", help="learning curve sizes, e.g. 32,128,512,ALL")
    e.add_argument("--curve-adapters", help="comma-separated adapters for --curve (default: every classify adapter)")
    e.add_argument("--no-router", action="store_true", help="skip the router evaluation")
    e.add_argument("--no-zero-shot", action="store_true",
                   help="skip the zero-shot column (the slowest part on a big --data file)")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("chat", parents=[common], help="chat in the terminal")
    c.set_defaults(func=cmd_chat)

    sub.add_parser("list", parents=[common], help="list adapters and their held-out scores").set_defaults(func=cmd_list)
    sub.add_parser("info", parents=[common], help="backbone, parameters, load time, adapters, memory").set_defaults(func=cmd_info)

    b = sub.add_parser("bench", parents=[common], help="speed benchmark; writes a markdown table")
    b.add_argument("--out", default="reports/bench.md")
    b.add_argument("--tokens", type=int, default=64)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", parents=[common], help="launch the Gradio demo on 127.0.0.1:7860")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=int(os.environ.get("BOT_PORT", 7860)))
    d.add_argument("--share", action="store_true", help="ask Gradio for a public share link (off by default)")
    d.set_defaults(func=cmd_demo)
    return p


def _training_threads() -> int:
    """Threads for a training run: ``$BOT_TRAIN_THREADS``, else the cores other jobs leave free.

    Threads time-sliced against other busy processes wait on each other at every
    parallel op, so a training run takes only the cores the 1-minute load average
    leaves idle (at least one).
    """
    cores = os.cpu_count() or 1
    if os.environ.get("BOT_TRAIN_THREADS"):
        return max(1, int(os.environ["BOT_TRAIN_THREADS"]))
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, cores - int(busy + 0.5)))


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


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None  # only a real command line may re-exec (tests call main(argv))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if from_shell and args.cmd == "train":
        _passive_omp_for_training(argv)
    args.command_line = _command_line(argv)
    try:
        return args.func(args)
    except BotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was overwritten", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
