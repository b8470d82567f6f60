"""Which device a backbone runs on, and in which precision its weights are held.

``--device auto`` picks CUDA, then Apple's MPS, then the CPU. ``--load-in auto`` keeps
today's CPU choice (float32 weights, bf16 autocast where the CPU has native bf16 math)
and holds the weights in bfloat16 on a GPU: the base weights are frozen during LoRA
training, so storing them in bf16 loses nothing that bf16 autocast would not lose anyway,
and halves the memory. ``8bit``/``4bit`` quantize the linear layers with bitsandbytes
(QLoRA-style), which needs CUDA.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch

from bot import settings
from bot.errors import BackboneError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: the CLI reads DEVICES/LOAD_IN before any model work

DEVICES = ("auto", "cpu", "cuda", "mps")
LOAD_IN = ("auto", "fp32", "bf16", "8bit", "4bit")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def resolve_device(choice: str | torch.device | None = None) -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` (None = ``$BOT_DEVICE`` or auto) into a torch.device.

    Raises:
        BackboneError: the device named is not present on this machine.
    """
    if isinstance(choice, torch.device):
        return choice
    choice = (choice or settings.get("BOT_DEVICE")).strip().lower()
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    kind = choice.split(":")[0]
    if kind not in DEVICES:
        raise BackboneError(f"--device {choice!r} is not one of {DEVICES}. Fix: pass --device auto")
    if kind == "cuda" and not torch.cuda.is_available():
        raise BackboneError("--device cuda was asked for, but torch sees no CUDA GPU on this machine "
                            f"(torch {torch.__version__}). Fix: pass --device auto or cpu, or "
                            "install a CUDA build of torch on a GPU machine")
    if kind == "mps" and not _mps_available():
        raise BackboneError("--device mps was asked for, but MPS (Apple GPU) is not available. "
                            "Fix: pass --device auto or cpu")
    return torch.device(choice)


def resolve_load_in(choice: str | None, device: torch.device) -> str:
    """The weight precision for ``--load-in`` on ``device`` (auto: fp32 on CPU/MPS, bf16 on CUDA).

    Raises:
        BackboneError: 8bit/4bit without CUDA or without bitsandbytes; an unknown choice.
    """
    choice = (choice or settings.get("BOT_LOAD_IN")).strip().lower()
    if choice not in LOAD_IN:
        raise BackboneError(f"--load-in {choice!r} is not one of {LOAD_IN}. Fix: pass --load-in auto")
    if choice == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if choice in ("8bit", "4bit"):
        if device.type != "cuda":
            raise BackboneError(
                f"--load-in {choice} quantizes the backbone with bitsandbytes, which needs a CUDA "
                f"GPU; this run's device is {device.type}. Fix: drop --load-in (float32 on the CPU), "
                "or use --load-in bf16, or run on a CUDA machine with --device cuda")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise BackboneError(f"--load-in {choice} needs the bitsandbytes package. "
                                "Fix: pip install 'bot[gpu]' (or pip install bitsandbytes)")
    return choice


def weight_dtype(load_in: str) -> torch.dtype:
    """The dtype non-quantized weights are held in."""
    return torch.float32 if load_in == "fp32" else torch.bfloat16


def quantization_config(load_in: str):
    """A transformers BitsAndBytesConfig for 8bit/4bit (NF4, bf16 compute), else None."""
    if load_in not in ("8bit", "4bit"):
        return None
    from transformers import BitsAndBytesConfig  # lazy: transformers is heavy

    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)


def compute_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype for matmuls on ``device``.

    GPUs: bf16 where supported, else fp16. CPU: bf16 where the CPU has native bf16 math;
    ``BOT_COMPUTE=fp32|bf16`` overrides either.
    """
    choice = settings.get("BOT_COMPUTE").lower()
    if choice in ("fp32", "float32"):
        return torch.float32
    if choice in ("bf16", "bfloat16"):
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    try:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except Exception:  # older torch builds lack the probe
        native = False
    return torch.bfloat16 if native else torch.float32


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s first parameter lives (cpu for a parameter-free module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` with every tensor moved to ``device`` (no copy when already there)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
