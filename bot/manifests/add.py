"""`bot add NAME --from FILE`: scaffold an adapter manifest from a user's CSV/JSONL."""

from __future__ import annotations

import logging
import random
from pathlib import Path

from bot.errors import DataError, SpecError
from bot.manifests.data import (
    Table,
    cell_text,
    check_classify_rows,
    label_text,
    read_rows,
    require_column,
)
from bot.manifests.spec import (
    MANIFEST,
    AdapterSpec,
    LoraSettings,
    TrainSettings,
    check_adapter_name,
)
from bot.manifests.versions import to_trash

TRASH = ".trash"
log = logging.getLogger(__name__)

MIN_PER_LABEL = 5  # fewer examples than this rarely reach the held-out split and are learned poorly
# `bot add` warns (it does not refuse) when the labels are many for the data. The line:
# more than WARN_MIN_LABELS labels with fewer than WARN_ROWS_PER_LABEL rows per label on
# average. Why there: bot.manifests.data.split keeps 70 % for training and 20 % for testing, so 20 rows
# give a label about 14 training examples and 4 test ones; with fewer, one mistake moves that
# label's held-out score by 25 points or more, and the README's TREC-50 run (109 rows per
# label, no warning) learned the labels it had 3 training examples of poorly. With 20 labels
# or fewer, thin data is a small-data problem that merging labels would not solve, so it is
# not this warning's business. And more than WARN_LABELS labels: bot train scores 1,000
# held-out examples by default, so most labels would get no held-out score at all (issue 28
# tried 10,000 labels of 5 rows).
WARN_ROWS_PER_LABEL = 20
WARN_MIN_LABELS = 20
WARN_LABELS = 1000


def _cells(table: Table, path: Path, col: str, label: bool = False) -> list[str]:
    """One column as text (numbers too; see bot.manifests.data); empty cells refused with their lines."""
    read = label_text if label else cell_text
    values = [read(r.get(col), path, f"{table.unit} {n}", col) for r, n in zip(table.rows, table.lines)]
    empty = [n for v, n in zip(values, table.lines) if not v]
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
        raise DataError(f"{path}: {len(empty)} row(s) have an empty '{col}' ({table.unit} {shown}). "
                        "Fix: fill or delete those rows")
    return values


def _columns(columns: list[str], path: Path, wanted: dict[str, str]) -> None:
    for role, col in wanted.items():
        require_column(columns, col, path, role, hint=f" (set it with --{role}-col)")


def scaffold(name: str, source: Path, kind: str = "classify", text_col="text", label_col="label",
             prompt_col="prompt", reply_col="reply", description: str = "",
             min_per_label: int = MIN_PER_LABEL) -> AdapterSpec:
    """Validate the file and build a manifest with defaults that train on a laptop CPU.

    Args:
        min_per_label: labels with fewer examples are refused (a lower value is kept in
            the manifest as ``data.min_per_label``, so ``bot train`` accepts them too).
    """
    table = read_rows(source)
    rows, columns = table.rows, table.columns
    rng = random.Random(0)
    if kind == "classify":
        _columns(columns, source, {"text": text_col, "label": label_col})
        texts = _cells(table, source, text_col)
        labels = check_classify_rows([{"label": v} for v in _cells(table, source, label_col, label=True)],
                                     source, min_per_label)
        warn_label_count(len(labels), len(rows), source)
        data = {"path": str(source.resolve()), "text_col": text_col, "label_col": label_col}
        if min_per_label != MIN_PER_LABEL:
            data["min_per_label"] = min_per_label
        lora = LoraSettings(layers=list(range(-16, 0)))  # the top 16 layers
        template = "{text}"
    else:
        _columns(columns, source, {"prompt": prompt_col, "reply": reply_col})
        texts = _cells(table, source, prompt_col)
        _cells(table, source, reply_col)
        if len(rows) < 5:
            raise DataError(f"{source}: only {len(rows)} prompt/reply pairs; need at least 5")
        labels = []
        data = {"path": str(source.resolve()), "prompt_col": prompt_col, "reply_col": reply_col}
        lora = LoraSettings()
        template = ""
    examples = rng.sample(texts, min(8, len(texts)))
    # classify: epochs chosen from the data (stopping.auto_epochs), ended early by validation
    # and the time budget; generate: small sets get more passes, big ones one
    epochs = None if kind == "classify" else 3.0 if len(rows) < 1000 else 1.0
    return AdapterSpec(name=name, kind=kind, labels=labels, data=data, template=template,
                       description=description or f"{kind} adapter trained on {source.name}",
                       lora=lora, train=TrainSettings(epochs=epochs),
                       route_examples=[e[:300] for e in examples],
                       reply_template="**{label}** ({score:.2f})" if kind == "classify" else "")


def warn_label_count(n_labels: int, n_rows: int, source) -> str | None:
    """Log (and return) a warning when ``n_labels`` are many for ``n_rows`` (see WARN_LABELS)."""
    reasons = []
    if n_labels > WARN_MIN_LABELS and n_rows < WARN_ROWS_PER_LABEL * n_labels:
        reasons.append(f"{n_rows / n_labels:.1f} rows per label on average, below "
                       f"{WARN_ROWS_PER_LABEL}: about {0.7 * n_rows / n_labels:.0f} training and "
                       f"{0.2 * n_rows / n_labels:.0f} test examples each, too few to learn or "
                       "to score a label")
    if n_labels > WARN_LABELS:
        reasons.append(f"more than {WARN_LABELS:,} labels: `bot train` scores 1,000 held-out "
                       "examples by default, so most labels would get no held-out score")
    if not reasons:
        return None
    message = (f"{source}: {n_labels:,} labels for {n_rows:,} rows; " + "; and ".join(reasons)
               + ". Fix: merge labels into fewer, broader ones, or add rows (training still "
               "works, but expect the adapter to learn these labels poorly)")
    log.warning("warning: %s", message)
    return message


def add_adapter(*, name: str, source: str | Path, adapters_dir: str | Path, kind: str = "classify",
                text_col: str = "text", label_col: str = "label", prompt_col: str = "prompt",
                reply_col: str = "reply", description: str = "", force: bool = False,
                min_per_label: int = MIN_PER_LABEL) -> Path:
    """Check ``source`` and write ``adapters_dir/name/adapter.yaml``; return its path.

    With ``force`` an existing folder is moved whole to ``adapters_dir/.trash/NAME-<time>/``
    first (logged), so no old weights, head or metrics.json stay beside the new manifest and
    nothing trained is lost.

    Args:
        name: the new adapter's name (also its folder and /command).
        source: the user's CSV, TSV, JSONL or JSON file.
        adapters_dir: folder holding the adapter folders.
        kind: "classify" or "generate".
        text_col, label_col: classify columns.
        prompt_col, reply_col: generate columns.
        description: one line for /help and the demo.
        force: replace an existing adapter folder (the old one goes to ``.trash``).
        min_per_label: rarer labels are refused (see :func:`scaffold`).
    """
    check_adapter_name(name, "bot add NAME")
    source = Path(source).expanduser()
    folder = Path(adapters_dir) / name
    occupied = check_target(folder, force)
    spec = scaffold(name, source, kind, text_col, label_col, prompt_col, reply_col, description,
                    min_per_label)
    if occupied:
        move_aside(folder)
    return spec.save(folder)


def check_target(folder: Path, force: bool, moved_to: str = "") -> bool:
    """Whether ``folder`` already holds files; refused (SpecError) unless ``force``."""
    if folder.exists() and not folder.is_dir():
        raise SpecError(f"{folder} exists and is not a folder. Fix: pick another name or move it away")
    occupied = folder.is_dir() and any(folder.iterdir())
    if occupied and not force:
        what = "an adapter" if (folder / MANIFEST).exists() else "files"
        raise SpecError(f"{folder} already holds {what}. Fix: pick another name, or pass --force to "
                        f"move the old folder to {moved_to or str(folder.parent / TRASH) + '/'} and "
                        "start afresh")
    return occupied


def move_aside(folder: Path) -> Path:
    """Move ``folder`` to ``<parent>/.trash/<name>-<timestamp>/`` (hidden, so never loaded)."""
    dest = to_trash(folder, name=folder.name)
    log.info("moved the old %s folder (weights, metrics, manifest) to %s", folder.name, dest)
    return dest
