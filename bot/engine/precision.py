"""Which matmul kernels the engine's step uses on this CPU: measured once, cached, explained.

A decode step at batch 1 reads every weight once, so fewer bytes per weight should win,
but only where the CPU computes the smaller type natively; and a step over many tokens
is compute-bound, where a kernel that unpacks int8 per row loses to plain bf16 or
float32 matmuls. Measured on one 2-core machine (``scripts/kernel_layers.py`` style,
576 -> 3072 layer): with AVX512-BF16, int8 weight-only took 120 us at 1 row and 928 us at
16 rows, bf16 505 us and 313 us; with AVX2 only, bf16 is emulated (4.2 ms at 16 rows) and
float32 wins at 16 rows (1.1 ms). So the engine holds two kernels: ``small`` for steps of
at most ``threshold`` tokens (decoding one or a few streams) and ``large`` for the rest
(many streams, prefill). Rather than guess from CPU flags, the first use measures every
candidate's lean step (bot.engine.lean) at 1 and at 16 tokens on the loaded backbone's own
weights, gates each on the perplexity of a probe text (within ``MAX_PPL_RATIO`` of
float32), and caches the pair in ``$BOT_CACHE/kernels.json`` keyed by ATen's kernel level,
native bf16 support, the torch version and the model's shape. ``BOT_KERNEL=<kind>`` forces
one kernel for both (``BOT_KERNEL=small,large`` forces a pair).

Kernels (``KINDS``): ``fp32`` (exact), ``bf16``, ``w8`` (int8 weight-only per output row,
bf16 activations, ``torch._weight_int8pack_mm``), ``w8f`` (the same int8 weights with
float32 activations), ``w4`` (int4 weight-only in groups of 32 with a scale and a minimum,
GGUF Q4_1's layout, ``torch._weight_int4pack_mm_for_cpu``, bf16 activations), and the
head variants ``w8h`` / ``bf16h`` (output head in float16 weights through fbgemm, float32
activations) and ``w8q`` (w8 with the output head in int4). The output head (vocabulary x
hidden, 49152 x 576 on the embedded backbone) is a fifth of the weights and the largest
single matmul of a decode step: at 1 row int4 took 1.4 ms for it, int8 2.9 ms, float32
7.3 ms (AVX512-BF16). PyTorch's dynamically quantized int8 (one scale per activation
tensor) put the probe perplexity at 2.6x for every layer (activation outliers): not
offered. ``q8`` (and ``q8h``, its float16-head variant) quantizes weights and activations
in blocks of 32 values with a scale each, llama.cpp's Q8_0 layout, so an outlier only
coarsens its own block: probe perplexity 1.012x (q8) and 1.006x (q8h) of float32. Its
integer dot products run in the compiled loop's C++ (AVX512-VNNI or AVX2); one 16-row
step of the embedded backbone took 21.4 ms against 36.6 ms for bf16h, and one row 7.1 ms
against 10.5 ms for w8h (AVX512-BF16; AVX2 only: 38.2 / 57.7 ms and 5.8 / 10.1 ms).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from bot.engine import native

log = logging.getLogger(__name__)

KINDS = ("fp32", "bf16", "w8", "w8f", "w4", "w8h", "bf16h", "w8q", "q8", "q8h")
# measured at first use; w4 (int4 body) is opt-in: the embedded backbone's body is GGUF Q4_1,
# but re-quantizing the de-quantized weights does not land on the same grid (probe
# perplexity 1.11x fp32, over the gate), and packing it costs seconds
CANDIDATES = ("fp32", "bf16", "w8", "w8f", "w8h", "bf16h", "w8q", "q8", "q8h")
DESCRIPTIONS = {
    "fp32": "float32 weights and math (exact)",
    "bf16": "bfloat16 weights and activations",
    "w8": "int8 weight-only (one scale per row), bfloat16 activations",
    "w8f": "int8 weight-only (one scale per row), float32 activations",
    "w4": "int4 weight-only (groups of 32, scale + minimum), bfloat16 activations",
    "w8h": "w8, with the output head in float16 weights and float32 activations",
    "bf16h": "bf16, with the output head in float16 weights and float32 activations",
    "w8q": "w8, with the output head in int4 weight-only (groups of 32)",
    "q8": "int8 weights times int8 activations, each with one scale per 32 values",
    "q8h": "q8, with the output head in float16 weights and float32 activations",
}
MAX_PPL_RATIO = 1.02
# a candidate must beat float32 by this margin to be chosen over the exact kernel (timing noise)
MIN_GAIN = 1.05
# the two step sizes measured: one decoding stream, and a full batch of streams
SMALL_TOKENS, LARGE_TOKENS = 1, 16
CACHE_FILE = "kernels.json"
KERNEL_ENV = "BOT_KERNEL"
# held-out probe for the perplexity gate: not from any training set of this project
PROBE_TEXT = (
    "The lighthouse keeper climbed the narrow stairs every evening to light the lamp. "
    "Ships far out at sea watched for its beam, and on stormy nights he stayed awake until dawn, "
    "listening to the waves break against the rocks below. In the morning he wrote the weather "
    "in a thick notebook: the wind, the height of the swell, the ships that had passed. "
    "Once a year a boat brought flour, oil, letters and newspapers that were already old.\n"
    "Q: What did the keeper do on stormy nights?\nA: He stayed awake until dawn.\n"
    "Q: What came with the yearly boat?\nA: Flour, oil, letters and old newspapers.\n"
    "Most people think the job was lonely, but the keeper said he never felt alone: the sea "
    "was always talking, and every ship that answered his light was a conversation."
)

# head kernel of each kind (the body's kernel is BODY's)
HEAD = {"w8h": "f16", "bf16h": "f16", "w8q": "w4", "q8h": "f16"}
BODY = {"w8h": "w8", "bf16h": "bf16", "w8q": "w8", "q8h": "q8"}
# kinds with CPU-only layers (int8/int4 weight-only, fbgemm): other devices fall back to bf16
QUANTIZED = ("w8", "w8f", "w4", "w8h", "bf16h", "w8q", "q8", "q8h")


def activation_dtype(kind: str) -> torch.dtype:
    """The dtype activations use under ``kind``."""
    return torch.float32 if BODY.get(kind, kind) in ("fp32", "w8f", "q8") else torch.bfloat16


def head_kind(kind: str) -> str:
    """The output head's kernel under ``kind`` (a kind, or ``f16``)."""
    return HEAD.get(kind, BODY.get(kind, kind))


def for_device(kind: str, device) -> str:
    """``kind``, or bf16 where the device is not a CPU (the quantized kernels are CPU kernels)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return "bf16" if kind in QUANTIZED and dev.type != "cpu" else kind


def native_bf16() -> bool:
    """True when oneDNN computes bf16 natively on this CPU (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # older builds lack the probe
        return False


# ---------------------------------------------------------------- layers
class Int8WeightLinear(nn.Module):
    """A frozen linear layer with int8 weights (one scale per output row).

    Args:
        weight, bias: the float weights to quantize.
        act_dtype: dtype of inputs and outputs (bf16 or fp32).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_dtype=torch.bfloat16):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.act_dtype = act_dtype
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.to(act_dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(act_dtype))
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.act_dtype), self.qweight, self.scale)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4WeightLinear(nn.Module):
    """A frozen linear layer with int4 weights in groups of ``group`` inputs, bf16 in/out.

    Each group stores ``scale`` and ``minimum`` (``w ~ q * scale + minimum``, q in 0..15),
    the layout of GGUF Q4_1: the embedded backbone's weights were de-quantized from it,
    so its base weights round-trip exactly (up to bf16 scales).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: int = 32):
        super().__init__()
        n, k = weight.shape
        w = weight.detach().float().reshape(n, k // group, group)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = torch.round((w - lo) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
        # the kernel computes (q - 8) * scale + zero, so zero = minimum + 8 * scale
        zero = lo + 8 * scale
        sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_zeros", sz.contiguous().to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))
        self.group, self.in_features, self.out_features = group, k, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.packed,
                                              self.group, self.scales_zeros)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Float16WeightLinear(nn.Module):
    """A frozen linear layer with float16 weights run by fbgemm, float32 activations.

    Used for the output head (see the module docstring); returns float32 (logits are read
    in float32 anyway). Needs PyTorch's x86 quantized engine; elsewhere building it raises
    RuntimeError and the kernel choice skips the kinds that use it.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()

        w = weight.detach().float()
        n, k = w.shape
        self.inner = DynamicLinear(k, n, bias_=bias is not None, dtype=torch.float16)
        self.inner.set_weight_bias(w, None if bias is None else bias.detach().float())
        self.in_features, self.out_features = k, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float())


class _Dense:
    """A float32 or bf16 weight (and bias) applied with ``F.linear``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.weight = weight if weight.dtype == dtype else weight.to(dtype)
        self.bias = None if bias is None else bias.to(dtype)
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def linear_for(weight: torch.Tensor, bias: torch.Tensor | None, kind: str):
    """A callable ``x -> x @ weight.T + bias`` in kernel ``kind`` (or ``f16`` for a head).

    ``fp32`` keeps ``weight`` itself (no copy); the others convert a copy once.
    """
    if kind == "f16":
        return Float16WeightLinear(weight, bias).forward
    body = BODY.get(kind, kind)
    if body in ("fp32", "bf16"):
        return _Dense(weight, bias, activation_dtype(body))
    if body == "q8":
        return Q8Call(weight, bias)
    out, inp = weight.shape
    if body == "w4" and inp % 32 == 0 and out % 8 == 0:
        return Int4WeightLinear(weight, bias).forward
    act = torch.bfloat16 if body == "w4" else activation_dtype(body)
    return Int8Call(Int8WeightLinear(weight, bias, act))


class Int8Call:
    """``Int8WeightLinear`` as a bare call for the lean step's (tokens, in) inputs: one kernel
    call, no reshapes (a decode step makes 120 of these calls; each skipped op is ~1-3 us).
    Its tensors are attributes, for bot.engine.native."""

    def __init__(self, layer: Int8WeightLinear):
        self.layer = layer
        self.qweight, self.scale, self.bias, self.act = layer.qweight, layer.scale, layer.bias, layer.act_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self.layer.forward(x)
        y = torch._weight_int8pack_mm(x if x.dtype == self.act else x.to(self.act), self.qweight, self.scale)
        return y if self.bias is None else y + self.bias


class Q8Call:
    """int8 weights times int8 activations: ``native.cpp``'s ``q8_linear``.

    Weights and activations are int8 in blocks of 32 values along the input, each block
    with its own scale (llama.cpp's Q8_0 layout; the per-tensor scale of dynamic
    quantization put the probe perplexity at 2.6x, see above). Weights are packed so one
    64-byte load holds 4 inputs of 16 outputs. Needs the compiled engine loop
    (bot.engine.native); without it building one raises RuntimeError and the kernel choice
    skips the kinds that use it. Outputs and inputs are zero-padded to the kernel's blocks
    of 16 and 32 (a padded layer runs in the Python step: the compiled loop takes exact widths).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        mod = native.module()
        if mod is None:
            raise RuntimeError(f"the q8 kernel needs the compiled engine loop, which is {native.reason()}")
        out, inp = weight.shape
        rows, cols = out + (-out % 16), inp + (-inp % 32)  # zero-padded up to the kernel's blocks
        w = F.pad(weight.detach().float(), (0, cols - inp, 0, rows - out)).view(rows, cols // 32, 32)
        scale = w.abs().amax(dim=-1).clamp(min=1e-8) / 127.0
        q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
        self.packed = q.view(rows // 16, 16, cols // 4, 4).permute(0, 2, 1, 3).contiguous()
        # the VNNI kernel multiplies x + 128 (unsigned): 128 * each block's weight sum undoes it
        self.corr = _by_block(q.sum(-1, dtype=torch.int32) * 128)
        self.scale = _by_block(scale)
        self.bias = None if bias is None else F.pad(bias.detach().float(), (0, rows - out)).contiguous()
        self.in_features, self.out_features, self.padded = inp, out, rows != out
        self._op, self._bias = mod.q8_linear, torch.empty(0) if bias is None else self.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self._op(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]), self.packed, self.corr, self.scale,
                     self._bias)
        if self.padded:
            y = y[:, :self.out_features]
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)


def _by_block(t: torch.Tensor) -> torch.Tensor:
    """(N, K/32) per-block values -> (N/16, K/32, 16), the order the kernel reads them."""
    rows, blocks = t.shape
    return t.view(rows // 16, 16, blocks).permute(0, 2, 1).contiguous()


class Q8Linear(nn.Module):
    """:class:`Q8Call` as a module (transformers' forward, for families the lean step lacks)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.call = Q8Call(weight, bias)
        self.in_features, self.out_features = self.call.in_features, self.call.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(x)


def convert(model: nn.Module, kind: str) -> nn.Module:
    """Put ``model`` (float32, frozen) into kernel ``kind`` in place (the transformers fallback).

    Every ``nn.Linear`` (lm_head included) is replaced for the quantized kinds; the other
    weights take the activation dtype. ``fp32`` leaves the model as it is (weights shared).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kernel '{kind}'; choose one of {KINDS}")
    if activation_dtype(kind) == torch.bfloat16:
        model.to(torch.bfloat16)
    if head_kind(kind) == "f16":  # the head first: it is no nn.Linear afterwards
        head = model.get_output_embeddings()
        model.set_output_embeddings(Float16WeightLinear(head.weight, head.bias))
    body = BODY.get(kind, kind)
    if body in ("w8", "w8f", "w4", "q8"):
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, child_name, _quantized(child, body))
    return model


def _quantized(child: nn.Linear, kind: str) -> nn.Module:
    if kind == "q8":
        return Q8Linear(child.weight, child.bias)
    if kind == "w4" and child.in_features % 32 == 0 and child.out_features % 8 == 0:
        return Int4WeightLinear(child.weight, child.bias)
    if kind == "w4":  # shapes the int4 kernel cannot take stay at 8 bits
        return Int8WeightLinear(child.weight, child.bias, torch.bfloat16)
    return Int8WeightLinear(child.weight, child.bias, activation_dtype(kind))
