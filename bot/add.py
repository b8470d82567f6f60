"""`bot add NAME --from FILE`: scaffold an adapter manifest from a user's CSV/JSONL."""

from __future__ import annotations

import random
from pathlib import Path

from .data import check_classify_rows, read_table, require_column
from .errors import DataError, SpecError
from .spec import AdapterSpec, LoraSettings, TrainSettings

MIN_PER_LABEL = 5  # fewer examples than this rarely reach the held-out split and are learned poorly


def _check_cells(rows: list[dict], path: Path, cols: list[str]) -> None:
    """Reject empty cells, naming the first offending rows (header = line 1)."""
    for col in cols:
        empty = [i + 2 for i, r in enumerate(rows) if not str(r.get(col) or "").strip()]
        if empty:
            shown = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
            raise DataError(f"{path}: {len(empty)} row(s) have an empty '{col}' (line {shown}). "
                            "Fix: fill or delete those rows")


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
    rows, columns = read_table(source)
    rng = random.Random(0)
    if kind == "classify":
        _columns(columns, source, {"text": text_col, "label": label_col})
        _check_cells(rows, source, [text_col, label_col])
        labels = check_classify_rows([{"label": str(r[label_col]).strip()} for r in rows], source,
                                     min_per_label)
        data = {"path": str(source.resolve()), "text_col": text_col, "label_col": label_col}
        if min_per_label != MIN_PER_LABEL:
            data["min_per_label"] = min_per_label
        examples = [str(r[text_col]) for r in rng.sample(rows, min(8, len(rows)))]
        lora = LoraSettings(layers=list(range(-16, 0)))  # the top 16 layers
        template = "{text}"
    else:
        _columns(columns, source, {"prompt": prompt_col, "reply": reply_col})
        _check_cells(rows, source, [prompt_col, reply_col])
        if len(rows) < 5:
            raise DataError(f"{source}: only {len(rows)} prompt/reply pairs; need at least 5")
        labels = []
        data = {"path": str(source.resolve()), "prompt_col": prompt_col, "reply_col": reply_col}
        examples = [str(r[prompt_col]) for r in rng.sample(rows, min(8, len(rows)))]
        lora = LoraSettings()
        template = ""
    # small sets get more passes; big ones one pass (keeps `bot train` within minutes)
    epochs = 3.0 if len(rows) < 1000 else 1.0
    return AdapterSpec(name=name, kind=kind, labels=labels, data=data, template=template,
                       description=description or f"{kind} adapter trained on {source.name}",
                       lora=lora, train=TrainSettings(epochs=epochs, max_examples=8000),
                       route_examples=[e[:300] for e in examples],
                       reply_template="**{label}** ({score:.2f})" if kind == "classify" else "")


def add_adapter(args) -> Path:
    source = Path(args.source).expanduser()
    folder = Path(args.adapters_dir) / args.name
    if (folder / "adapter.yaml").exists() and not args.force:
        raise SpecError(f"{folder / 'adapter.yaml'} already exists. Fix: pick another name or pass --force")
    spec = scaffold(args.name, source, args.kind, args.text_col, args.label_col, args.prompt_col,
                    args.reply_col, args.description, getattr(args, "min_per_label", MIN_PER_LABEL))
    return spec.save(folder)
