"""AdapterSpec: the manifest ``adapters/<name>/adapter.yaml``.

YAML keys mirror the dataclass fields one to one. Every validation error names the
file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .errors import SpecError
from .fsutil import atomic_write_text

KINDS = ("classify", "generate")
MANIFEST = "adapter.yaml"
# Every linear layer of a Llama-style decoder block. Other families (GPT-2, GPT-NeoX...)
# name their layers differently: bot.arch.lora_targets resolves the list per backbone.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NAME_PATTERN = r"[A-Za-z][A-Za-z0-9_-]*"
"""An adapter name: a letter, then letters, digits, '-' or '_' (it is also a folder and a /command)."""
_NAME = re.compile(rf"^{NAME_PATTERN}$")


def check_adapter_name(name: str, where: str = "") -> None:
    """Raise SpecError unless ``name`` is a valid adapter name.

    Args:
        name: the adapter name to check.
        where: the file or place it came from, named in the message.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(f"{where or 'adapter'}: key 'name' must be a letter followed by letters, "
                        f"digits, '-' or '_', got {name!r}. Fix: rename the adapter (e.g. 'spam' "
                        "or 'spam-2'), and its folder with it")


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
        _require(self.r >= 1, where, "lora.r", "an integer >= 1", self.r)
        _require(self.alpha > 0, where, "lora.alpha", "a number > 0", self.alpha)
        _require(0 <= self.dropout < 1, where, "lora.dropout", "a number in [0, 1)", self.dropout)
        _require(bool(self.target_modules), where, "lora.target_modules", "a non-empty list", self.target_modules)

    def to_peft(self, num_layers: int | None = None, model=None):
        """A peft LoraConfig; with ``model``, targets it lacks are swapped for its own (bot.arch)."""
        from peft import LoraConfig

        targets, conv1d = list(self.target_modules), False
        if model is not None:
            from .arch import lora_targets, targets_are_conv1d

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


@dataclass
class TrainSettings:
    epochs: float = 1.0
    """Passes over the training split (fractions allowed)."""
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

    def check(self, where: str) -> None:
        _require(self.epochs > 0, where, "train.epochs", "a number > 0", self.epochs)
        _require(self.learning_rate > 0, where, "train.learning_rate", "a number > 0", self.learning_rate)
        _require(self.batch_size >= 1, where, "train.batch_size", "an integer >= 1", self.batch_size)
        _require(self.max_length >= 8, where, "train.max_length", "an integer >= 8", self.max_length)


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
    """`{bundled: ID}` or `{path: FILE, text_col:, label_col:}` / `{path:, prompt_col:, reply_col:}`."""
    template: str = "{text}"
    """Classify: input template with {text}. Generate: the system prompt ('' = the model's own)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings."""
    train: TrainSettings = field(default_factory=TrainSettings)
    """Training settings."""
    route_examples: list[str] = field(default_factory=list)
    """Utterances a user would type to reach this adapter (router)."""
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
        if self.kind == "classify" and self.labels:
            _require(len(self.labels) >= 2, where, "labels", "at least two labels", self.labels)
        if self.data:
            _require(bool(self.data.get("bundled") or self.data.get("path")), where, "data",
                     "a mapping with `bundled: ID` or `path: FILE`", self.data)
        if self.kind == "classify":
            _require("{text}" in self.template, where, "template", "a string containing {text}", self.template)
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
            raise SpecError(f"{path}: not valid YAML ({err})") from err
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
            if not isinstance(kwargs.get(key, []), list):
                raise SpecError(f"{path}: key '{key}' must be a list, got {kwargs[key]!r}")
        if not isinstance(kwargs.get("data", {}), dict):
            raise SpecError(f"{path}: key 'data' must be a mapping, got {kwargs['data']!r}")
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
            raise SpecError(f"{path}: key '{key}.{k}' must be {_TYPE_WORDS[types[k]]}, got {v!r}")
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
        raise SpecError(f"{where}: key '{key}' must be {expected}, got {got!r}")


def discover(adapters_dir: str | Path) -> list[AdapterSpec]:
    """Every ``*/adapter.yaml`` under ``adapters_dir``, sorted by name."""
    root = Path(adapters_dir)
    if not root.is_dir():
        return []
    return [AdapterSpec.from_dir(p.parent) for p in sorted(root.glob(f"*/{MANIFEST}"))]
