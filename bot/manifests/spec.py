"""AdapterSpec: the manifest ``adapters/<name>/adapter.yaml``.

YAML keys mirror the dataclass fields one to one. Every validation error names the
file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from bot.errors import SpecError
from bot.model.families import DEFAULT_TARGET_MODULES, lora_targets, targets_are_conv1d
from bot.util.fsutil import atomic_write_text

KINDS = ("classify", "generate", "base")
"""``base``: the bare backbone (no LoRA, no training), e.g. the ``assistant`` route."""
MANIFEST = "adapter.yaml"

# ------------------------------------------------------------------ adapter names
MAX_NAME = 64
NAME_PATTERN = rf"[A-Za-z][A-Za-z0-9_-]{{0,{MAX_NAME - 1}}}"
"""An adapter name: a letter, then letters, digits, '-' or '_' (it is also a folder and a /command)."""
NAME_RULE = f"letters, digits, '-' or '_', starting with a letter, at most {MAX_NAME} characters"
# 'help' and 'auto' are chat commands / the demo's "let the router choose"; 'base' and
# '__base__' mean the bare backbone (peft's own name for it). Compared case-insensitively,
# because typed commands are ("/Help" is "/help").
RESERVED_NAMES = ("help", "auto", "base", "__base__")
_NAME = re.compile(NAME_PATTERN)

# Bounds on manifest values (docs/adding-a-task.md lists them). They are generous:
# they only catch typos and values that would run for ever or exhaust memory.
MAX_EPOCHS = 100
MAX_BUDGET_MINUTES = 7 * 24 * 60
MAX_WINDOWS = 64
MAX_RANK = 512
MAX_BATCH = 4096
MAX_LENGTH = 131072  # also capped by the backbone's own context when training
MAX_LR = 1.0

# Placeholders each format string in a manifest may use.
TEMPLATE_FIELDS = {"template": ("text",), "reply_template": ("label", "score")}
_SAMPLE = {"text": "sample text", "label": "sample", "score": 0.5}


def check_adapter_name(name: str, where: str = "") -> None:
    """Raise SpecError unless ``name`` is a safe folder name and /command, and not reserved.

    Args:
        name: the adapter name to check.
        where: the file or place it came from (a manifest, a flag), named in the message.
    """
    where = where or "adapter"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = (f"{name[:40]!r}... ({len(name)} characters)" if isinstance(name, str) and len(name) > 60
                 else repr(name))
        raise SpecError(f"{where}: key 'name' must be {NAME_RULE}, got {shown}. Fix: rename the adapter "
                        "(e.g. 'spam' or 'spam-2'), and its folder with it")
    if name.lower() in RESERVED_NAMES:
        raise SpecError(f"{where}: key 'name' {name!r} is reserved (reserved: {', '.join(RESERVED_NAMES)}). "
                        "Fix: pick another name")


def check_template(value, where: str, key: str) -> None:
    """A format string may use only its allowed placeholders and must fill in cleanly."""
    allowed = TEMPLATE_FIELDS[key]
    words = ", ".join("{" + a + "}" for a in allowed)
    fix = f"Fix: use only {words} (write a literal brace as {{{{ or }}}})"
    if not isinstance(value, str):
        raise SpecError(f"{where}: key '{key}' must be a string, got {value!r}")
    try:
        used = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
    except ValueError as err:
        raise SpecError(f"{where}: key '{key}' is not a valid template ({err}). {fix}") from err
    for f in used:
        if f not in allowed:  # also refuses {} / {0} and attribute or index access
            raise SpecError(f"{where}: key '{key}' uses the unknown placeholder {{{f}}}; "
                            f"allowed placeholders: {words}. {fix}")
    try:
        value.format(**_SAMPLE)
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise SpecError(f"{where}: key '{key}' cannot be filled in ({err}), e.g. a format like "
                        f"{{score:.2q}}. {fix}; formats as in Python, e.g. {{score:.2f}}") from err


def check_run_values(*, epochs: float | None = None, max_examples: int | None = None,
                     eval_examples: int | None = None, budget: float | None = None) -> None:
    """Refuse out-of-range `bot train` overrides before any work starts."""
    if budget is not None and not (_finite(budget) and 0 < budget <= MAX_BUDGET_MINUTES):
        raise SpecError(f"--budget must be a number of minutes in (0, {MAX_BUDGET_MINUTES}], got "
                        f"{budget!r}. Fix: pass e.g. --budget 20")
    if epochs is not None and not (_finite(epochs) and 0 < epochs <= MAX_EPOCHS):
        raise SpecError(f"--epochs must be a finite number in (0, {MAX_EPOCHS}], got {epochs!r}. "
                        "Fix: pass e.g. --epochs 1 (fractions such as 0.5 are allowed)")
    for flag, value in (("--max-examples", max_examples), ("--eval-examples", eval_examples)):
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise SpecError(f"{flag} must be a whole number >= 1, got {value!r}. "
                            f"Fix: pass e.g. {flag} 100, or leave it out")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class LoraSettings:
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    """Linear layers that get a LoRA pair."""
    layers: list[int] | None = None
    """Only these decoder layers get LoRA (None = all; negative = from the top). Upper layers only = cheaper backward."""

    def check(self, where: str) -> None:
        _require(isinstance(self.r, int) and 1 <= self.r <= MAX_RANK, where, "lora.r",
                 f"an integer in [1, {MAX_RANK}]", self.r)
        _require(_finite(self.alpha) and 0 < self.alpha <= 8 * MAX_RANK, where, "lora.alpha",
                 f"a number in (0, {8 * MAX_RANK}]", self.alpha)
        _require(_finite(self.dropout) and 0 <= self.dropout < 1, where, "lora.dropout",
                 "a number in [0, 1)", self.dropout)
        _require(bool(self.target_modules) and all(isinstance(m, str) and m for m in self.target_modules),
                 where, "lora.target_modules", "a non-empty list of layer names", self.target_modules)

    def to_peft(self, num_layers: int | None = None, model=None):
        """A peft LoraConfig; with ``model``, targets it lacks are swapped for its own (bot.model.families)."""
        from peft import LoraConfig  # lazy: peft is heavy

        targets, conv1d = list(self.target_modules), False
        if model is not None:
            targets = lora_targets(model, targets)
            conv1d = targets_are_conv1d(model, targets)  # peft would flip it with a warning
            num_layers = num_layers or getattr(model.config, "num_hidden_layers", None)
        layers = self.layers
        if layers is not None and num_layers is not None:
            # negative indices count from the top; indices the model lacks are dropped,
            # so "the top 16 layers" also works on a smaller backbone
            layers = sorted({i if i >= 0 else num_layers + i for i in layers} & set(range(num_layers)))
            layers = layers or None
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=targets, layers_to_transform=layers, fan_in_fan_out=conv1d,
                          bias="none")


def _repeat_count(n) -> bool:
    """A valid ``view_repeats`` count: an integer (not a bool) in [0, 100]."""
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 100


@dataclass
class TrainSettings:
    epochs: float | None = 1.0
    """Most passes over the training split (fractions allowed); null = chosen from the numbers
    of examples and labels (``bot.tasks.stopping.auto_epochs``). Classify training stops
    earlier once the validation score stops improving, or when the budget is spent."""
    learning_rate: float = 2e-4
    """AdamW peak learning rate (linear warm-up then decay)."""
    batch_size: int = 16
    """Examples per optimizer step."""
    max_length: int = 128
    """Tokens per example; longer inputs are truncated."""
    seed: int = 0
    """Seed for the split, the shuffling and the initial weights."""
    max_examples: int | None = None
    """Cap on training examples (None = the whole training split)."""
    head_lr: float = 1e-3
    """Learning rate for a classification head."""
    patience: int = 3
    """Classify: validation checks in a row without a better score before training stops
    (the best checkpoint is kept); 0 = never stop early."""
    budget_minutes: float = 20.0
    """Classify: wall-clock minutes training may take (the frozen-layer cache and validation
    included); the learning-rate schedule is fitted to it once the step time is known."""
    max_windows: int = 8
    """Classify: a text longer than ``max_length`` is read as up to this many overlapping
    windows, their predictions pooled (1 = cut the text to fit, as before)."""
    view_repeats: int | dict[str, int] = 1
    """Times each extra view of a row (a BBC headline) is trained on per epoch (classify):
    one number for every view, or ``{view: times}`` (a view not named: once; 0: the view
    is evaluated, never trained on)."""

    def repeats(self, view: str) -> int:
        """How often the extra view ``view`` is trained on per epoch."""
        if isinstance(self.view_repeats, dict):
            return self.view_repeats.get(view, 1)
        return self.view_repeats

    def check(self, where: str) -> None:
        _require(self.epochs is None or (_finite(self.epochs) and 0 < self.epochs <= MAX_EPOCHS),
                 where, "train.epochs", f"null (automatic) or a finite number in (0, {MAX_EPOCHS}]",
                 self.epochs)
        _require(isinstance(self.patience, int) and not isinstance(self.patience, bool)
                 and 0 <= self.patience <= 1000, where, "train.patience",
                 "an integer in [0, 1000] (0 = never stop early)", self.patience)
        _require(_finite(self.budget_minutes) and 0 < self.budget_minutes <= MAX_BUDGET_MINUTES, where,
                 "train.budget_minutes", f"a finite number in (0, {MAX_BUDGET_MINUTES}]", self.budget_minutes)
        _require(isinstance(self.max_windows, int) and not isinstance(self.max_windows, bool)
                 and 1 <= self.max_windows <= MAX_WINDOWS, where, "train.max_windows",
                 f"an integer in [1, {MAX_WINDOWS}] (1 = cut long texts)", self.max_windows)
        for key in ("learning_rate", "head_lr"):
            value = getattr(self, key)
            _require(_finite(value) and 0 < value <= MAX_LR, where, f"train.{key}",
                     f"a finite number in (0, {MAX_LR}]", value)
        _require(isinstance(self.batch_size, int) and 1 <= self.batch_size <= MAX_BATCH, where,
                 "train.batch_size", f"an integer in [1, {MAX_BATCH}]", self.batch_size)
        _require(isinstance(self.max_length, int) and 8 <= self.max_length <= MAX_LENGTH, where,
                 "train.max_length", f"an integer in [8, {MAX_LENGTH}] (and within the backbone's "
                 "context)", self.max_length)
        _require(isinstance(self.seed, int) and 0 <= self.seed < 2**32, where, "train.seed",
                 "an integer in [0, 2**32)", self.seed)
        _require(self.max_examples is None or (isinstance(self.max_examples, int) and self.max_examples >= 1),
                 where, "train.max_examples", "null or an integer >= 1", self.max_examples)
        per_view = self.view_repeats if isinstance(self.view_repeats, dict) else {"any": self.view_repeats}
        _require(all(isinstance(view, str) and view and _repeat_count(n) for view, n in per_view.items()),
                 where, "train.view_repeats", "an integer in [0, 100], or a mapping {view: integer in "
                 "[0, 100]} such as {headline: 2, lede: 0}", self.view_repeats)


@dataclass
class AdapterSpec:
    name: str
    """Adapter name; also the folder name and the /override command."""
    kind: str
    """`classify` (label + probabilities) or `generate` (a reply)."""
    description: str = ""
    """One line shown in /help and the demo's Adapters tab."""
    labels: list[str] = field(default_factory=list)
    """Class labels (classify only), in head order."""
    data: dict = field(default_factory=dict)
    """`{bundled: ID}` or `{path: FILE, text_col:, label_col:}` / `{path:, prompt_col:, reply_col:}`;
    optional `train_extra: [FILE, ...]`: more rows for the training split only (never held out)."""
    template: str = "{text}"
    """Classify: input template with {text}. Generate: the system prompt ('' = the model's own)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings."""
    train: TrainSettings = field(default_factory=TrainSettings)
    """Training settings."""
    route_examples: list[str] = field(default_factory=list)
    """Utterances a user would type to reach this adapter (router)."""
    route_description: str = ""
    """What turns this route takes, in a sentence or two (README, /help, the demo)."""
    route_data: dict = field(default_factory=dict)
    """Where the router's example turns come from, like `data` (empty = `data` itself); its
    training split gives route texts, its validation split fits the router, its test split tests it."""
    reply_template: str = ""
    """Classify: how a reply reads, with {label} and {score}, e.g. 'Sounds {label} ({score:.2f})'."""
    backbone: dict = field(default_factory=dict)
    """Filled by training: {name, fingerprint}."""
    folder: Path | None = field(default=None, compare=False)
    """Where the manifest was read from (not saved)."""

    def __post_init__(self):
        where = str(self.folder / MANIFEST) if self.folder else f"adapter '{self.name}'"
        check_adapter_name(self.name, where)
        _require(self.kind in KINDS, where, "kind", f"one of {KINDS}", self.kind)
        for key in ("description", "template", "reply_template"):
            _require(isinstance(getattr(self, key), str), where, key, "a string", getattr(self, key))
        if self.kind == "classify" and self.labels:
            _require(len(self.labels) >= 2, where, "labels", "at least two labels", self.labels)
        for key in ("data", "route_data"):
            value = getattr(self, key)
            if value:
                _require(bool(value.get("bundled") or value.get("path")), where, key,
                         "a mapping with `bundled: ID` or `path: FILE`", value)
        extra = self.data.get("train_extra", [])
        _require(isinstance(extra, list) and all(isinstance(x, str) for x in extra), where,
                 "data.train_extra", "a list of file paths", extra)
        if self.kind == "classify":
            _require("{text}" in self.template, where, "template", "a string containing {text}", self.template)
            check_template(self.template, where, "template")
        # generate: `template` is a system prompt, sent as written (never formatted)
        if self.reply_template:
            check_template(self.reply_template, where, "reply_template")
        self.lora.check(where)
        self.train.check(where)

    # ------------------------------------------------------------- file I/O
    @classmethod
    def from_dir(cls, folder: str | Path) -> AdapterSpec:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise SpecError(f"{path} does not exist. Fix: create it with `bot add {folder.name} --from FILE`")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise SpecError(f"{path}: not valid YAML ({err}). Fix: correct the line named above, "
                            f"or recreate it with `bot add {folder.name} --from FILE --force`") from err
        except (UnicodeDecodeError, OSError) as err:
            raise SpecError(f"{path}: cannot be read ({err}). Fix: re-save it as UTF-8 text") from err
        return cls.from_dict(raw, path)

    @classmethod
    def from_dict(cls, raw, path: str | Path = MANIFEST) -> AdapterSpec:
        path = Path(path)
        if not isinstance(raw, dict):
            raise SpecError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)} - {"folder"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SpecError(f"{path}: unknown key(s) {unknown}; allowed keys: {sorted(known)}")
        for key in ("name", "kind"):
            if key not in raw:
                raise SpecError(f"{path}: missing required key '{key}'")
        kwargs = dict(raw)
        kwargs["lora"] = _sub(LoraSettings, raw.get("lora") or {}, path, "lora")
        kwargs["train"] = _sub(TrainSettings, raw.get("train") or {}, path, "train")
        for key in ("labels", "route_examples"):
            value = kwargs.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SpecError(f"{path}: key '{key}' must be a list of strings, got {value!r}. "
                                "Fix: quote numbers and yes/no words, e.g. ['0', '1']")
        for key in ("data", "route_data"):
            if not isinstance(kwargs.get(key, {}), dict):
                raise SpecError(f"{path}: key '{key}' must be a mapping, got {kwargs[key]!r}")
        try:
            return cls(**kwargs, folder=path.parent)
        except TypeError as err:
            raise SpecError(f"{path}: {err}") from err

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("folder")
        return out

    def save(self, folder: str | Path) -> Path:
        """Write adapter.yaml atomically into ``folder``."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=100)
        return atomic_write_text(Path(folder) / MANIFEST, text)

    def replace(self, **changes) -> AdapterSpec:
        return dataclasses.replace(self, **changes)


def _sub(cls, raw, path: Path, key: str):
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: key '{key}' must be a mapping, got {raw!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SpecError(f"{path}: unknown key(s) {[f'{key}.{u}' for u in unknown]}; "
                        f"allowed under '{key}': {sorted(known)}")
    types = {f.name: f.type for f in fields(cls)}
    for k, v in raw.items():
        if not _type_ok(v, types[k]):
            raise SpecError(f"{path}: key '{key}.{k}' must be {_TYPE_WORDS[types[k]]}, got {v!r}. "
                            f"Fix: write it as {_TYPE_WORDS[types[k]]} (see docs/adding-a-task.md)")
    return cls(**raw)


_TYPE_WORDS = {"int": "an integer", "float": "a number", "int | None": "an integer or null",
               "list[str]": "a list of strings", "list[int] | None": "a list of integers or null"}


def _type_ok(v, want: str) -> bool:
    is_int = isinstance(v, int) and not isinstance(v, bool)
    if want == "int":
        return is_int
    if want == "float":
        return is_int or isinstance(v, float)
    if want == "int | None":
        return v is None or is_int
    if want == "list[str]":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if want == "list[int] | None":
        return v is None or (isinstance(v, list) and all(isinstance(x, int) for x in v))
    return True


def _require(ok: bool, where: str, key: str, expected: str, got) -> None:
    if not ok:
        raise SpecError(f"{where}: key '{key}' must be {expected}, got {got!r}. "
                        f"Fix: set '{key}' to {expected}")


def scan(adapters_dir: str | Path) -> tuple[list[AdapterSpec], dict[str, str]]:
    """Read every adapter folder under ``adapters_dir``; a bad one never hides the others.

    Hidden folders (``.NAME.tmp-*`` left by an interrupted save, ``.trash``) are skipped.
    When two folders carry the same manifest name, the folder named like the manifest
    wins (else the first in sort order); the other is marked failed with both paths.

    Returns:
        (valid specs sorted by name, {folder name: why it failed, with file, key and fix}).
    """
    root = Path(adapters_dir)
    if not root.is_dir():
        return [], {}
    found, failed = [], {}
    for folder in sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file()):
        try:
            found.append(AdapterSpec.from_dir(folder))
        except SpecError as err:
            failed[folder.name] = str(err)
    groups: dict[str, list[AdapterSpec]] = {}
    for spec in found:  # case-insensitive: "/Topic" and "/topic" are the same command
        groups.setdefault(spec.name.lower(), []).append(spec)
    specs = []
    for group in groups.values():
        keep = next((s for s in group if s.folder.name == s.name), group[0])
        specs.append(keep)
        for other in group:
            if other is not keep:
                failed[other.folder.name] = (
                    f"{other.folder / MANIFEST}: name '{other.name}' is already used by "
                    f"{keep.folder / MANIFEST}. Fix: give this copy its own name (rename the folder "
                    f"and its 'name:' key to match), or delete {other.folder}")
    return sorted(specs, key=lambda s: s.name), failed


def require_usable(specs: list[AdapterSpec], failed: dict[str, str]) -> None:
    """A bad folder never hides the good ones, but when every folder failed that is the error.

    Raises:
        SpecError: with each failed folder's message (file, key and fix).
    """
    if failed and not specs:
        raise SpecError("\n".join(failed[name] for name in sorted(failed)))


def discover(adapters_dir: str | Path) -> list[AdapterSpec]:
    """The valid adapters under ``adapters_dir``, sorted by name (see ``scan`` for the failed)."""
    return scan(adapters_dir)[0]
