"""Optional llama.cpp engine: the backbone's own GGUF file plus our adapters as GGUF LoRA files.

llama.cpp decodes a small model on a CPU several times faster than eager PyTorch (its
quantized dot products and threading are tuned per CPU; figures in reports/bench.md).
When ``llama-cpp-python`` is installed (``pip install -e '.[llamacpp]'``; it compiles
llama.cpp, about 15 minutes on 2 cores) a generation adapter can run there:

* the base model is the GGUF file the backbone was converted from (the embedded
  SmolLM2 Q4_1 file, or the ``.gguf`` a user named), so the weights are the same;
* each peft LoRA adapter is written with the ``gguf`` package as a GGUF LoRA adapter
  (the layout of llama.cpp's ``convert_lora_to_gguf.py``: ``general.type = adapter``,
  ``adapter.type = lora``, ``adapter.lora.alpha``, tensors ``<base tensor>.lora_a`` of
  shape (r, in) and ``.lora_b`` of shape (out, r)). llama.cpp scales by alpha / r, so
  alpha is written as peft's scaling times r. llama.cpp stores the q/k projections of
  Llama models with rows permuted for its rotary layout (transformers undoes that when
  reading GGUF), so ``lora_b`` of q_proj and k_proj gets the same permutation.

``BOT_LLAMACPP_PATH`` may name a site-packages folder holding a llama_cpp build made in
another environment (appended to ``sys.path`` only if the import fails otherwise).

`bot chat --engine llamacpp` (or ``BOT_ENGINE=llamacpp``) sends the terminal chat's
generated replies here (:func:`chat_engine`); classification, routing, the demo and
`bot serve` stay on PyTorch. One conversation decodes at a time, so this is the
single-user engine; without llama-cpp-python, or for a backbone not loaded from a
GGUF file, the chat says why and uses the PyTorch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from bot import settings
from bot.errors import AdapterError, BotError
from bot.util.assets import cache_dir

log = logging.getLogger(__name__)

ENV_PATH = "BOT_LLAMACPP_PATH"
ENGINE_ENV = "BOT_ENGINE"
ENGINES = ("torch", "llamacpp")


class EngineLRU:
    """llama.cpp instances keyed by ``(adapter, variant)``, built once under ``lock``; the most
    recent ``size`` kept (an instance is costly to build and worth keeping while in use)."""

    def __init__(self, lock):
        self.lock = lock
        self.items: OrderedDict[tuple, object] = OrderedDict()

    def get(self, key: tuple, build, size: int):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            engine = self.items[key] = build()
            while len(self.items) > size:
                self.items.popitem(last=False)
            return engine

    def drop(self, adapter: str | None) -> None:
        """Forget every instance built for ``adapter``."""
        with self.lock:
            for key in [k for k in self.items if k[0] == adapter]:
                del self.items[key]


def import_llama_cpp():
    """The ``llama_cpp`` module, or None when it is not installed (nor under ``BOT_LLAMACPP_PATH``)."""
    try:
        import llama_cpp  # lazy: optional, and heavy

        return llama_cpp
    except ImportError:
        extra = settings.get(ENV_PATH)
        if not extra or not Path(extra).is_dir():
            return None
    if extra not in sys.path:
        sys.path.append(extra)  # appended: our own numpy etc. keep precedence
    try:
        import llama_cpp  # lazy: optional, and heavy

        return llama_cpp
    except ImportError as err:
        log.warning("%s=%s holds no importable llama_cpp: %s", ENV_PATH, extra, err)
        return None


def source_gguf(backbone) -> Path | None:
    """The GGUF file the backbone's weights came from (its cache folder's SOURCE.txt), if any."""
    src = Path(str(backbone.info.source)) / "SOURCE.txt"
    if not src.is_file():
        return None
    path = Path(src.read_text().strip().removeprefix("converted from ").strip())
    return path if path.is_file() else None


def _permute_rows(b: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary row order for q/k projections (applied to a LoRA ``B``, rows = outputs)."""
    out = b.shape[0]
    return b.reshape(n_head, 2, out // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def write_lora_gguf(backbone, adapter: str, path: Path) -> Path:
    """Write ``adapter`` (a peft LoRA on a Llama backbone) as a llama.cpp GGUF LoRA file.

    Args:
        backbone: the Backbone holding the adapter.
        adapter: its name.
        path: the ``.gguf`` file to write (atomically).
    """
    import gguf  # lazy: gguf is heavy
    from peft.tuners.lora import LoraLayer  # lazy: peft is heavy

    config = backbone.base.config
    if config.model_type != "llama":
        raise AdapterError(f"the llama.cpp engine converts adapters of Llama models only, not "
                           f"'{config.model_type}'. Fix: use the PyTorch engine (the default)")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors = []
    with backbone.lock:
        for mod_name, module in backbone.base.named_modules():
            if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
                continue
            hf_name = mod_name.removeprefix("base_model.model.")
            target = names.get_name(hf_name)
            if target is None:
                raise AdapterError(f"adapter '{adapter}' adapts {hf_name}, which llama.cpp has no "
                                   "tensor for. Fix: train it on the attention/MLP projections only")
            a = module.lora_A[adapter].weight.detach().float()
            b = module.lora_B[adapter].weight.detach().float()
            if hf_name.endswith("q_proj"):
                b = _permute_rows(b, config.num_attention_heads)
            elif hf_name.endswith("k_proj"):
                b = _permute_rows(b, config.num_key_value_heads)
            r = a.shape[0]
            alpha = float(module.scaling[adapter]) * r  # llama.cpp applies alpha / r
            tensors.append((f"{target}.weight", a.contiguous().numpy(), b.contiguous().numpy()))
    if not tensors:
        raise AdapterError(f"adapter '{adapter}' has no LoRA layers on this backbone")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for base, a, b in tensors:
        writer.add_tensor(f"{base}.lora_a", a)
        writer.add_tensor(f"{base}.lora_b", b)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _adapter_digest(backbone, adapter: str) -> str:
    h = hashlib.sha256(backbone.fingerprint.encode())
    with backbone.lock:
        for n, p in backbone.peft.named_parameters():
            if f".{adapter}." in n:
                h.update(n.encode())
                h.update(p.detach().float().numpy().tobytes())
    return h.hexdigest()[:16]


class LlamaCppGenerator:
    """Generate through llama.cpp: one ``Llama`` per adapter (the base file is mmapped, shared).

    Args:
        backbone: a Backbone converted from a GGUF file (``source_gguf`` finds it).
        n_threads: llama.cpp threads (default: all cores torch uses).
        n_ctx: context length of each instance.
        max_engines: instances kept (an LRU).
    """

    def __init__(self, backbone, n_threads: int | None = None, n_ctx: int = 1024, max_engines: int = 3):
        self.llama_cpp = import_llama_cpp()
        if self.llama_cpp is None:
            raise BotError("llama-cpp-python is not installed. Fix: pip install -e '.[llamacpp]' "
                           f"(compiles llama.cpp, ~15 min), or set {ENV_PATH} to a site-packages holding it")
        self.gguf = source_gguf(backbone)
        if self.gguf is None:
            raise BotError(f"backbone {backbone.info.name} was not converted from a GGUF file, so "
                           "llama.cpp has no base file. Fix: load it from a .gguf file")
        self.backbone = backbone
        self.n_threads = n_threads or torch.get_num_threads()
        self.n_ctx = n_ctx
        self.max_engines = max_engines
        self._lock = threading.RLock()  # also held while decoding: one decode at a time
        self._engines = EngineLRU(self._lock)

    def lora_file(self, adapter: str) -> Path:
        """The adapter as a GGUF LoRA file in ``$BOT_CACHE/gguf-lora`` (written once per content)."""
        path = cache_dir() / "gguf-lora" / f"{adapter}-{_adapter_digest(self.backbone, adapter)}.gguf"
        if not path.exists():
            write_lora_gguf(self.backbone, adapter, path)
        return path

    def engine(self, adapter: str | None, logits_all: bool = False):
        def build():
            lora = str(self.lora_file(adapter)) if adapter else None
            return self.llama_cpp.Llama(model_path=str(self.gguf), lora_path=lora, n_ctx=self.n_ctx,
                                        n_threads=self.n_threads, logits_all=logits_all, verbose=False)

        return self._engines.get((adapter, logits_all), build, self.max_engines)

    def invalidate(self, adapter: str | None) -> None:
        self._engines.drop(adapter)

    def generate(self, input_ids: list[int], adapter: str | None = None, max_new_tokens: int = 128,
                 suppress_eos: bool = False, repetition_penalty: float = 1.0) -> list[int]:
        """Greedy reply token ids; ``suppress_eos`` forces exactly ``max_new_tokens``."""
        return list(self.tokens(input_ids, adapter, max_new_tokens, suppress_eos, repetition_penalty))

    def _eos(self, llm) -> set[int]:
        """llama.cpp's end-of-sequence id and the backbone's (a chat template may end turns with another)."""
        ids = {int(llm.token_eos())}
        for value in (self.backbone.tokenizer.eos_token_id,
                      getattr(self.backbone.base.generation_config, "eos_token_id", None)):
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
        return ids

    def tokens(self, input_ids: list[int], adapter: str | None = None, max_new_tokens: int = 128,
               suppress_eos: bool = False, repetition_penalty: float = 1.0) -> Iterator[int]:
        """Greedy reply token ids as they come (one decode at a time: the lock is held throughout).

        ``repetition_penalty`` is llama.cpp's repeat penalty, over its last 64 tokens (the
        prompt's tail included); transformers' penalises every earlier token. The
        end-of-sequence id is not yielded.
        """
        llm = self.engine(adapter)
        eos = self._eos(llm)
        kwargs = {}
        if suppress_eos:
            def no_eos(_ids, logits):
                logits[list(eos)] = -np.inf
                return logits

            kwargs["logits_processor"] = self.llama_cpp.LogitsProcessorList([no_eos])
        if max_new_tokens <= 0:
            return
        count = 0
        with self._lock:
            for tok in llm.generate(list(input_ids), top_k=1, temp=0.0, reset=True,
                                    repeat_penalty=repetition_penalty, **kwargs):
                if tok in eos and not suppress_eos:
                    return
                yield int(tok)
                count += 1
                if count >= max_new_tokens:
                    return

    def stream(self, input_ids: list[int], adapter: str | None = None, max_new_tokens: int = 128,
               repetition_penalty: float = 1.0) -> Iterator[str]:
        """The greedy reply as text pieces, decoded with the backbone's tokenizer (same vocabulary)."""
        tok = self.backbone.tokenizer
        ids, text = [], ""
        for t in self.tokens(input_ids, adapter, max_new_tokens, repetition_penalty=repetition_penalty):
            ids.append(t)
            new = tok.decode(ids, skip_special_tokens=True)
            if new.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            if len(new) > len(text):
                yield new[len(text):]
            text = new

    def logits(self, adapter: str | None):
        """``batch -> logits`` for GenerateTask.perplexity (rows scored one by one, unpadded)."""
        llm = self.engine(adapter, logits_all=True)

        def run(enc: dict) -> torch.Tensor:
            rows = []
            ids, mask = enc["input_ids"], enc["attention_mask"]
            width = ids.shape[1]
            with self._lock:
                for row, m in zip(ids.tolist(), mask.tolist()):
                    keep = [i for i, k in enumerate(m) if k]
                    llm.reset()
                    llm.eval([row[i] for i in keep])
                    scores = torch.from_numpy(llm.scores[: len(keep)].copy())
                    full = torch.zeros(width, scores.shape[1])  # padded positions carry no labels
                    full[keep] = scores
                    rows.append(full)
            return torch.stack(rows)

        return run


def chat_engine(backbone, engine: str | None = None) -> LlamaCppGenerator | None:
    """The llama.cpp engine for `bot chat` replies, or None for the PyTorch path.

    Args:
        backbone: the loaded Backbone.
        engine: "torch" or "llamacpp" (None: ``$BOT_ENGINE``, else "torch").

    Raises:
        BotError: ``engine`` names no engine. When llama.cpp was asked for but cannot run
            here (not installed, backbone not from a GGUF file), the reason is logged as a
            warning and None is returned: the chat still works, on PyTorch.
    """
    name = (engine or settings.get(ENGINE_ENV)).strip().lower()
    if name not in ENGINES:
        source = "--engine" if engine else ENGINE_ENV
        raise BotError(f"{source}={name} is not an engine. Fix: use one of {', '.join(ENGINES)}")
    if name == "torch":
        return None
    try:
        gen = LlamaCppGenerator(backbone)
    except BotError as err:
        log.warning("the llama.cpp engine cannot run here, so replies use the PyTorch fast path: %s", err)
        return None
    log.info("generated replies run on llama.cpp (%s, adapters as GGUF LoRA files)", gen.gguf.name)
    return gen
