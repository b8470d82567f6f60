"""``bot export``: write the backbone and adapters in the form vLLM serves unchanged.

What vLLM's LoRA loader accepts (sources, read 2026; facts only, no code copied):
* vllm/lora/peft_helper.py: ``adapter_config.json`` needs ``r``, ``lora_alpha``,
  ``target_modules``; ``use_dora`` is refused; ``bias`` other than "none" needs
  ``--enable-lora-bias``; ``r`` must be <= ``--max-lora-rank``; ``use_rslora`` is read;
  ``rank_pattern``/``alpha_pattern``/``layers_to_transform`` are not read (the tensors
  in the file decide which layers get LoRA, vllm/lora/lora_model.py).
* vllm/config/lora.py: ``--max-lora-rank`` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512.
* vllm/model_executor/models/llama.py: LoRA on q/k/v (packed as qkv_proj), o_proj,
  gate/up (packed as gate_up_proj) and down_proj.
* vLLM pull request 53555 (merged 2026): a sequence-classification adapter may carry its
  head through peft's ``modules_to_save`` as ``score`` (or ``classifier``); its shape is
  checked against the base model's head, so every classifier on one instance has the
  same number of labels. Older releases refuse any ``modules_to_save``.
* vllm/model_executor/models/adapters.py (``as_seq_cls_model``): the classifier head is
  ``score``, a linear layer without bias over the last token's final hidden state,
  followed by a softmax: the same maths as bot's classify task.
peft writes a ``modules_to_save`` module as ``base_model.model.<name>.weight`` (checked
with peft 0.21 in tests/unit/export/test_vllm.py).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from bot.engine.plain import plain_model
from bot.errors import AdapterError, ExportError, FingerprintMismatch
from bot.export.readme import render_readme
from bot.manifests.registry import load_task
from bot.manifests.spec import AdapterSpec
from bot.model.backbone import read_adapter_weights
from bot.routing.route_data import spec_splits
from bot.tasks.classify import HEAD_FILE
from bot.util.fsutil import atomic_dir_write

log = logging.getLogger(__name__)

TARGETS = ("vllm",)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MANIFEST = "export.json"
TRASH = ".trash"  # beside the export folder, as bot add --force's adapters/.trash
BASE = "base"
HEAD_MODULE = "score"
PEFT_PREFIX = "base_model.model."
HEAD_KEY = f"{PEFT_PREFIX}{HEAD_MODULE}.weight"


@dataclass
class Item:
    """One adapter checked and ready to write."""

    spec: AdapterSpec
    config: dict
    weights: dict[str, torch.Tensor]
    head: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def rank(self) -> int:
        return int(self.config["r"])


# ------------------------------------------------------------------ checks
def check_lora_config(config: dict, path: Path, name: str) -> list[str]:
    """Every reason vLLM would refuse or misread this ``adapter_config.json``."""
    retrain = f"Fix: set it in adapters/{name}/adapter.yaml and retrain (`bot train {name}`)"
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; vLLM loads LoRA only. {retrain}")
    if config.get("use_dora"):
        problems.append(f"use_dora is true; vLLM does not load DoRA adapters. {retrain} "
                        "without DoRA")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append(f"LoRA bias ({config.get('bias')!r}, lora_bias={config.get('lora_bias')}) "
                        f"is refused by vLLM unless served with --enable-lora-bias, and is not "
                        f"exported. {retrain} with bias: none")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"{key} is set; vLLM ignores it, so the adapter would run with the "
                            f"wrong rank or scale. {retrain} with one rank and alpha")
    for key in ("target_parameters", "trainable_token_indices", "layer_replication",
                "modules_to_save"):
        if config.get(key):
            problems.append(f"{key} is set; vLLM's LoRA loader does not read it. {retrain}")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        problems.append(f"target_modules is a pattern ({targets!r}); name the modules one by one "
                        f"from {list(VLLM_LORA_MODULES)}. {retrain}")
    else:
        bad = sorted(set(targets) - set(VLLM_LORA_MODULES))
        if bad:
            problems.append(f"target_modules {bad} are not LoRA-capable in vLLM's Llama; use only "
                            f"{list(VLLM_LORA_MODULES)}. {retrain}")
    return [f"{path}: {p}" for p in problems]


def check_lora_tensors(weights: dict[str, torch.Tensor], rank: int, path: Path) -> list[str]:
    """Tensor names in peft's form with a supported module, and A/B shapes of rank ``rank``."""
    problems = []
    for key, tensor in weights.items():
        parts = key.split(".")
        ok = (key.startswith(PEFT_PREFIX) and len(parts) >= 4 and parts[-1] == "weight"
              and parts[-2] in ("lora_A", "lora_B") and parts[-3] in VLLM_LORA_MODULES)
        if not ok:
            problems.append(f"{path}: tensor {key!r} is not a LoRA A/B weight of "
                            f"{list(VLLM_LORA_MODULES)}")
            continue
        got = tensor.shape[0] if parts[-2] == "lora_A" else tensor.shape[-1]
        if tensor.dim() != 2 or got != rank:
            problems.append(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, not rank {rank}")
    if not weights:
        problems.append(f"{path} holds no tensors")
    return problems


def read_head(folder: Path, spec: AdapterSpec, hidden: int) -> tuple[torch.Tensor | None, list[str]]:
    """The classifier head's weight, refusing a head vLLM's bias-free ``score`` cannot hold."""
    path = folder / HEAD_FILE
    if not path.exists():
        return None, [f"{path} is missing: a classify adapter needs its head. "
                      f"Fix: bot train {spec.name}"]
    try:
        with safe_open(str(path), framework="pt") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:
        return None, [f"{path} is corrupt ({err}). Fix: bot train {spec.name}"]
    weight = state.get("weight")
    want = (len(spec.labels), hidden)
    if weight is None or tuple(weight.shape) != want:
        got = None if weight is None else tuple(weight.shape)
        return None, [f"{path}: head weight has shape {got}, expected {want} (labels "
                      f"{spec.labels}, hidden size {hidden}). Fix: bot train {spec.name}"]
    bias = state.get("bias")
    weight = weight.detach().to(torch.float32).contiguous()
    if bias is not None and bool(bias.abs().max() > 0):
        return (weight, bias.detach().to(torch.float32)), []  # checked on held-out data later
    return weight, []


def bias_free_check(backbone, spec: AdapterSpec, weight: torch.Tensor, bias: torch.Tensor,
                    max_rows: int = 1000, batch_size: int = 16) -> dict:
    """Does dropping the head's bias change any prediction on the held-out split?

    vLLM's ``score`` layer (and transformers' LlamaForSequenceClassification head) has no
    bias. Old heads were trained with one; the issue allows exporting them without it when
    no held-out prediction changes. The final states are computed once with bot's own
    classifier path; both heads are then applied to the same states.
    """
    rows = spec_splits(spec).test[:max_rows]
    texts = [t for r in rows for t in [r["text"], *r.get("views", {}).values()]]
    loaded_here = spec.name not in backbone.adapters
    if loaded_here:
        load_task(backbone, spec)
    changed, top = 0, 0.0
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=f"bias check {spec.name}",
                          unit="batch"):
            chunk = [backbone.fit_template(spec.template, t, spec.train.max_length)
                     for t in texts[start:start + batch_size]]
            states = backbone.pooled(chunk, spec.name, spec.train.max_length).float()
            with_bias = torch.softmax(states @ weight.T + bias, dim=-1)
            without = torch.softmax(states @ weight.T, dim=-1)
            changed += int((with_bias.argmax(-1) != without.argmax(-1)).sum())
            top = max(top, float((with_bias - without).abs().max()))
    finally:
        if loaded_here:
            backbone.drop_adapter(spec.name)
    return {"n": len(texts), "changed": changed, "max_prob_diff": round(top, 6),
            "max_abs_bias": round(float(bias.abs().max()), 6)}


def choose_max_lora_rank(ranks: list[int], requested: int | None) -> int:
    """The ``--max-lora-rank`` to serve with: ``requested``, or the smallest that fits."""
    if requested is not None and requested not in VLLM_MAX_LORA_RANKS:
        raise ExportError(f"--max-lora-rank {requested} is not a value vLLM accepts. "
                          f"Fix: use one of {list(VLLM_MAX_LORA_RANKS)}")
    if requested is not None:
        return requested
    top = max(ranks, default=8)
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= max(top, 8)), VLLM_MAX_LORA_RANKS[-1])


def plan_export(names: list[str], adapters_dir: Path, backbone, max_lora_rank: int | None):
    """Check every adapter before anything is written; raise one error listing all problems.

    Returns:
        (items, max_lora_rank)
    """
    if not names:
        raise ExportError("name at least one adapter to export, e.g. `bot export chat --to out/`")
    hidden = backbone.base.config.hidden_size
    items, problems = [], []
    for name in dict.fromkeys(names):
        folder = Path(adapters_dir) / name
        if not (folder / "adapter.yaml").is_file():
            known = sorted(p.parent.name for p in Path(adapters_dir).glob("*/adapter.yaml"))
            problems.append(f"no adapter '{name}' under {adapters_dir} (found: {known}). "
                            f"Fix: pass one of those names, or --adapters-dir")
            continue
        if name == BASE or name.startswith(f"{BASE}-classify-"):
            problems.append(f"adapter name '{name}' collides with the exported backbone folder "
                            f"'{name}/'. Fix: copy adapters/{name} to another name and export that")
            continue
        spec = AdapterSpec.from_dir(folder)
        trained_on = spec.backbone.get("fingerprint")
        if trained_on and not backbone.matches(trained_on):
            problems.append(str(FingerprintMismatch(
                f"{folder / 'adapter.yaml'}: '{name}' was trained on backbone {trained_on}, but the "
                f"backbone being exported is {backbone.fingerprint}. Fix: pass the backbone it was "
                f"trained on (--backbone), or retrain: bot train {name}")))
            continue
        try:
            weights = read_adapter_weights(folder)
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (AdapterError, OSError, ValueError) as err:
            problems.append(f"{folder}: cannot read the LoRA files ({err}). Fix: bot train {name}")
            continue
        found = check_lora_config(config, folder / "adapter_config.json", name)
        found += check_lora_tensors(weights, int(config.get("r", 0)),
                                    folder / "adapter_model.safetensors")
        head = None
        if spec.kind == "classify":
            head, head_problems = read_head(folder, spec, hidden)
            found += head_problems
        extra = {}
        if isinstance(head, tuple):  # a head with a bias: export it only if nothing changes
            head, bias = head
            extra["bias_dropped"] = check = bias_free_check(backbone, spec, head, bias)
            if check["changed"]:
                found.append(
                    f"{folder / 'head.safetensors'}: the head has a bias (max |bias| "
                    f"{check['max_abs_bias']:.3g}) and dropping it, as vLLM's bias-free `score` "
                    f"layer requires, changes {check['changed']} of {check['n']} held-out "
                    f"predictions. Fix: `bot train {name}` retrains the head without a bias")
            else:
                log.info("%s: head bias (max %.3g) dropped; no held-out prediction changes "
                         "(n=%d, largest probability change %.4f)", name, check["max_abs_bias"],
                         check["n"], check["max_prob_diff"])
        problems += found
        if not found:
            items.append(Item(spec, config, weights, head, extra))
    if problems:
        raise ExportError("cannot export for vLLM:\n  - " + "\n  - ".join(problems))
    chosen = choose_max_lora_rank([it.rank for it in items], max_lora_rank)
    too_big = [f"{it.name} (r={it.rank})" for it in items if it.rank > chosen]
    if too_big:
        top = max(it.rank for it in items)
        fix = (f"--max-lora-rank {choose_max_lora_rank([top], None)}, or retrain with a smaller "
               f"lora.r" if top <= VLLM_MAX_LORA_RANKS[-1] else
               f"retrain with lora.r <= {VLLM_MAX_LORA_RANKS[-1]} in adapter.yaml")
        raise ExportError(f"adapter rank above --max-lora-rank {chosen}: {', '.join(too_big)}; "
                          f"vLLM refuses them (it accepts --max-lora-rank "
                          f"{list(VLLM_MAX_LORA_RANKS)}). Fix: {fix}")
    return items, chosen


# ------------------------------------------------------------------ writers
def write_base(dest: Path, backbone) -> None:
    """The backbone as a plain transformers folder, with no adapter merged in."""
    model = plain_model(backbone)  # peft-free, sharing the backbone's tensors (saving reads them)
    # the engine shares the live backbone's config objects: edit copies, not the backbone
    model.config = copy.deepcopy(model.config)
    model.generation_config = copy.deepcopy(model.generation_config)
    model.config.pad_token_id = backbone.tokenizer.pad_token_id
    model.generation_config.pad_token_id = backbone.tokenizer.pad_token_id
    model.save_pretrained(dest)
    backbone.tokenizer.save_pretrained(dest)
    del model
    add_legacy_keys(dest)


def add_legacy_keys(folder: Path) -> None:
    """Spell config and tokenizer the way transformers 4.x reads them too.

    transformers 5 writes ``rope_parameters``, ``dtype`` and ``tokenizer_class:
    TokenizersBackend``; a vLLM release built on transformers 4.x would silently use the
    default rope theta (10000, not SmolLM2's 100000) and fail on the tokenizer class.
    transformers 5 reads the added legacy keys without complaint.
    """
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and rope.get("rope_type", "default") == "default":
        cfg.setdefault("rope_theta", rope["rope_theta"])
    if "dtype" in cfg:
        cfg.setdefault("torch_dtype", cfg["dtype"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok_path = folder / "tokenizer_config.json"
    if tok_path.exists():
        tok = json.loads(tok_path.read_text())
        if tok.get("tokenizer_class") == "TokenizersBackend":
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"  # the same class in both majors
        for key in ("is_local", "local_files_only"):  # where it was loaded from, not a setting
            tok.pop(key, None)
        tok_path.write_text(json.dumps(tok, indent=2) + "\n")


def write_classify_base(dest: Path, base: Path, backbone, labels: list[str]) -> None:
    """A ``*ForSequenceClassification`` folder sharing ``base``'s weight files (hard links).

    vLLM's weight loader wants a ``score.weight`` for a classifier; it is all zeros here
    (a request without an adapter gets uniform probabilities) and each adapter brings
    its own head. The weights are listed in ``model.safetensors.index.json``, which both
    transformers and vLLM read, so the base shards need not be copied.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as SEQ_CLS,
    )  # lazy: transformers is heavy

    cfg = copy.deepcopy(backbone.base.config)
    arch = SEQ_CLS.get(cfg.model_type)
    if arch is None:
        raise ExportError(f"transformers has no sequence-classification class for model type "
                          f"'{cfg.model_type}'; classify adapters cannot be exported for it")
    dest.mkdir(parents=True)
    weight_map = {}
    for shard in _base_shards(base):
        link = dest / f"backbone-{shard.name}"
        _link_or_copy(shard, link)
        with safe_open(str(shard), framework="pt") as fh:
            weight_map.update({k: link.name for k in fh.keys()})
    head = torch.zeros(len(labels), cfg.hidden_size, dtype=torch.float32)
    save_file({f"{HEAD_MODULE}.weight": head}, str(dest / "score.safetensors"),
              metadata={"format": "pt"})
    weight_map[f"{HEAD_MODULE}.weight"] = "score.safetensors"
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg.architectures = [arch]
    cfg.num_labels = len(labels)
    cfg.id2label = dict(enumerate(labels))
    cfg.label2id = {label: i for i, label in enumerate(labels)}
    cfg.pad_token_id = backbone.tokenizer.pad_token_id
    cfg.save_pretrained(dest)
    backbone.tokenizer.save_pretrained(dest)
    add_legacy_keys(dest)


def _base_shards(base: Path) -> list[Path]:
    index = base / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [base / n for n in names]
    return [base / "model.safetensors"]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(src, dst)


def write_adapter(dest: Path, item: Item, base_path: Path) -> None:
    """A peft folder: LoRA config + weights, plus the head as ``score`` for a classifier."""
    from peft import LoraConfig  # lazy: peft is heavy

    config = LoraConfig.from_pretrained(str(item.spec.folder))
    config.base_model_name_or_path = str(base_path)
    config.inference_mode = True
    weights = dict(item.weights)
    if item.head is not None:
        config.task_type = "SEQ_CLS"
        config.modules_to_save = [HEAD_MODULE]
        config.auto_mapping = None
        weights[HEAD_KEY] = item.head
    dest.mkdir(parents=True)
    config.save_pretrained(str(dest))
    save_file({k: v.contiguous() for k, v in weights.items()},
              str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    if item.head is not None:
        labels = list(item.spec.labels)
        meta = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {label: i for i, label in enumerate(labels)},
                "architecture": "LlamaForSequenceClassification", "head_module": HEAD_MODULE,
                "pooling": "last token", "activation": "softmax",
                "template": item.spec.template, "max_length": item.spec.train.max_length,
                "max_windows": item.spec.train.max_windows, "window_pooling": "mean log-probability"}
        (dest / "labels.json").write_text(json.dumps(meta, indent=2) + "\n")


def classify_groups(items: list[Item]) -> dict[int, list[Item]]:
    """Classifiers by label count: one vLLM pooling instance per count."""
    groups: dict[int, list[Item]] = {}
    for it in items:
        if it.spec.kind == "classify":
            groups.setdefault(len(it.spec.labels), []).append(it)
    return dict(sorted(groups.items()))


def group_labels(group: list[Item]) -> list[str]:
    """The labels a shared classify base reports: the adapters' own if they all agree."""
    first = list(group[0].spec.labels)
    if all(list(it.spec.labels) == first for it in group):
        return first
    return [f"LABEL_{i}" for i in range(len(first))]


def export(names: list[str], to: str | Path, *, backbone, adapters_dir: str | Path,
           target: str = "vllm", max_lora_rank: int | None = None, force: bool = False) -> dict:
    """Write ``names`` (and the backbone) into ``to`` for ``target``; return the manifest.

    Args:
        names: adapter names under ``adapters_dir``.
        to: the export folder; replaced atomically.
        backbone: the loaded Backbone the adapters were trained on.
        target: only "vllm" so far.
        max_lora_rank: vLLM's ``--max-lora-rank``; default the smallest that fits.
        force: ``to`` may hold files an export did not write: they are moved to
            ``<parent of to>/.trash/<name>-<time>/`` (their paths kept) instead of refused.
    Raises:
        ExportError: listing every adapter vLLM could not load, with the reason and fix; or
            ``to`` holds files no export wrote (without ``force``), or cannot be a folder.
    """
    if target not in TARGETS:
        raise ExportError(f"unknown export target '{target}'. Fix: --for one of {list(TARGETS)}")
    to = Path(to)
    foreign = check_destination(to, force)
    items, rank = plan_export(names, Path(adapters_dir), backbone, max_lora_rank)
    groups = classify_groups(items)
    manifest = {
        "target": target, "backbone": backbone.info.name, "fingerprint": backbone.fingerprint,
        "base": BASE, "max_lora_rank": rank,
        "generate": {it.name: {"path": it.name, "rank": it.rank, "base": BASE,
                               "system_prompt": _system_prompt(it.spec)}
                     for it in items if it.spec.kind == "generate"},
        "classify": {it.name: {"path": it.name, "rank": it.rank, "labels": list(it.spec.labels),
                               "template": it.spec.template, "max_length": it.spec.train.max_length,
                               "max_windows": it.spec.train.max_windows,
                               "base": f"{BASE}-classify-{n}",
                               **it.extra}
                     for n, group in groups.items() for it in group},
    }

    def write(tmp: Path) -> None:
        base = tmp / BASE
        log.info("writing %s", base)
        write_base(base, backbone)
        for n, group in groups.items():
            write_classify_base(tmp / f"{BASE}-classify-{n}", base, backbone, group_labels(group))
        for it in items:
            entry = manifest[it.spec.kind].get(it.name, {})
            write_adapter(tmp / it.name, it, to.resolve() / entry.get("base", BASE))
        (tmp / "README.md").write_text(render_readme(manifest), encoding="utf-8")
        # what this export wrote: a later export onto the folder keeps anything else
        manifest["files"] = sorted([*(p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
                                      if not p.is_dir()), MANIFEST])
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for path in tmp.rglob("*"):  # some writers leave files private; an export is for sharing
            path.chmod(0o755 if path.is_dir() else 0o644)

    def retire(old: Path) -> None:  # the previous export, moved aside: keep what was not ours
        if foreign:
            move_to_trash(old, foreign, to)
        shutil.rmtree(old, ignore_errors=True)

    try:
        atomic_dir_write(to, write, retire=retire)
    except FileExistsError as err:  # a component of --to is a file: say which, not [Errno 17]
        raise ExportError(_not_a_folder(to) or f"{to}: {err.strerror}") from err
    return manifest


def _not_a_folder(to: Path) -> str | None:
    """The message for a ``to`` that cannot be a folder (it or a parent is a file), or None."""
    for path in [to, *to.parents]:
        if path.exists() or path.is_symlink():
            if path.is_dir():
                return None
            what = "is a file" if path == to else f"is a file, so {to} cannot be created inside it"
            return f"{path} {what}. Fix: pass --to a folder path (new, or a previous export)"
    return None


def check_destination(to: str | Path, force: bool = False) -> list[Path]:
    """The files under ``to`` no export wrote (to move to the trash); refused unless ``force``.

    Raises:
        ExportError: ``to`` (or a parent) is a file; or it holds such files, without ``force``.
    """
    to = Path(to)
    foreign = foreign_files(to)
    if foreign and not force:
        shown = ", ".join(str(p) for p in foreign[:5]) + (f" and {len(foreign) - 5} more"
                                                           if len(foreign) > 5 else "")
        what = ("is a previous export but holds" if (to / MANIFEST).is_file() else
                f"is not a bot export (no {MANIFEST}) and holds")
        raise ExportError(f"{to} {what} {len(foreign)} file(s) no export wrote ({shown}); "
                          "exporting would delete them. Fix: pass a new folder to --to, or "
                          f"--force to move them to {to.parent / TRASH}/ first")
    return foreign


def foreign_files(to: Path) -> list[Path]:
    """Files under ``to`` (relative paths) that no ``bot export`` wrote there.

    An export's ``export.json`` lists its files; one written before that list existed owns
    its known top-level entries (base folders, adapters, README.md, export.json).

    Raises:
        ExportError: ``to`` (or a parent) is a file, or its export.json cannot be read.
    """
    bad = _not_a_folder(to)
    if bad:
        raise ExportError(bad)
    if not to.is_dir():
        return []
    present = sorted(p.relative_to(to) for p in to.rglob("*") if not p.is_dir())
    manifest_path = to / MANIFEST
    if not manifest_path.is_file():
        return present
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if "files" in manifest:
            ours = set(manifest["files"])
            return [p for p in present if p.as_posix() not in ours]
        tops = {MANIFEST, "README.md", manifest.get("base", BASE), *manifest.get("generate", {}),
                *manifest.get("classify", {}),
                *(e.get("base", "") for e in manifest.get("classify", {}).values())}
    except (ValueError, AttributeError, TypeError) as err:
        raise ExportError(f"{manifest_path} is not an export manifest ({err}). Fix: pass a new "
                          "folder to --to, or move this one away") from err
    return [p for p in present if p.parts[0] not in tops]


def move_to_trash(old: Path, files: list[Path], to: Path) -> Path:
    """Move ``files`` (relative to ``old``) to ``<to's parent>/.trash/<to's name>-<time>/``."""
    trash = to.parent / TRASH
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = trash / f"{to.name}-{stamp}", 1
    while dest.exists():
        n += 1
        dest = trash / f"{to.name}-{stamp}-{n}"
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        (old / rel).rename(target)
    log.warning("moved %d file(s) that no export wrote from %s to %s", len(files), to, dest)
    return dest


def _system_prompt(spec: AdapterSpec) -> str:
    """What bot sends as the system message ('' = the chat template's own default)."""
    return spec.template if spec.template and spec.template != "{text}" else ""
