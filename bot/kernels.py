"""Which matmul kernels generation uses on this CPU: measured once, cached, explained.

Decoding at batch 1 reads every weight once per token, so fewer bytes per weight should
win, but only where the CPU computes the smaller type natively. On a CPU with AVX512-BF16,
int8 weights with bfloat16 activations ran 3x float32; on an AVX2-only CPU the same
kernel emulates bf16 and one layer took about as long as a float32 matmul (figures in
README "Speed on every CPU"). Rather than guess from CPU flags, the first use measures
each candidate here, on the loaded backbone's own weights, and caches the winner in
``$BOT_CACHE/kernels.json`` keyed by ATen's kernel level, native bf16 support, the torch
version and the model's shape. ``BOT_KERNEL=<kind>`` overrides the choice.

Candidates (``KINDS``): ``fp32`` (exact), ``bf16``, ``w8`` (int8 weight-only per output
row, bf16 activations, ``torch._weight_int8pack_mm``), ``w8f`` (the same int8 weights
with float32 activations), ``w4`` (int4 weight-only in groups of 32 with a scale and a
minimum per group, GGUF Q4_1's layout; ``torch._weight_int4pack_mm_for_cpu``, bf16
activations; opt-in only, see ``CANDIDATES``), and ``w8h`` / ``bf16h``: ``w8`` / ``bf16``
with the output head in float16 weights and float32 activations (PyTorch's fbgemm matmul
for float16 weights). A candidate is eligible only if the perplexity of a probe text stays
within ``MAX_PPL_RATIO`` of float32.

Why a separate head kernel: the output head (vocabulary x hidden, 49152 x 576 on the embedded
backbone) is a fifth of the weights and the largest single matmul of a decode step. Timed
alone at batch 1 (``scripts/kernel_layers.py``, idle machine), ``_weight_int8pack_mm`` took
1.9 ms for it natively and 2.1 ms with AVX2 only, bf16 1.8 ms with AVX2 only, and fbgemm's
float16-weight matmul 1.4 / 1.2 ms, with a relative error of 2e-4. Dynamically quantized
int8 (int8 activations too) was faster still but put the probe perplexity at 1.03-1.04x fp32
for the head alone and 2.6x for every layer: activation outliers, so it is not a candidate.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

KINDS = ("fp32", "bf16", "w8", "w8f", "w4", "w8h", "bf16h")
# measured at first use; w4 is left out: its probe perplexity was 1.11x fp32 on the embedded
# backbone (over the 2 % gate) and packing it costs seconds, so it is opt-in (BOT_KERNEL=w4)
CANDIDATES = ("fp32", "bf16", "w8", "w8f", "w8h", "bf16h")
DESCRIPTIONS = {
    "fp32": "float32 weights and math (exact)",
    "bf16": "bfloat16 weights and activations",
    "w8": "int8 weight-only (one scale per row), bfloat16 activations",
    "w8f": "int8 weight-only (one scale per row), float32 activations",
    "w4": "int4 weight-only (groups of 32, scale + minimum), bfloat16 activations",
    "w8h": "w8, with the output head in float16 weights and float32 activations",
    "bf16h": "bf16, with the output head in float16 weights and float32 activations",
}
MAX_PPL_RATIO = 1.02
# a candidate must beat float32 by this margin to be chosen over the exact kernel (timing noise)
MIN_GAIN = 1.05
CACHE_FILE = "kernels.json"
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


# kinds whose output head is a Float16WeightLinear -> the kind of every other layer
F16_HEAD = {"w8h": "w8", "bf16h": "bf16"}
# kinds with CPU-only layers (int8/int4 weight-only, fbgemm): other devices fall back to bf16
QUANTIZED = ("w8", "w8f", "w4", *F16_HEAD)


def activation_dtype(kind: str) -> torch.dtype:
    """The dtype activations (and non-linear weights) use under ``kind``."""
    return torch.float32 if F16_HEAD.get(kind, kind) in ("fp32", "w8f") else torch.bfloat16


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
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        w = weight.detach().float()
        n, k = w.shape
        self.inner = DynamicLinear(k, n, bias_=bias is not None, dtype=torch.float16)
        self.inner.set_weight_bias(w, None if bias is None else bias.detach().float())
        self.in_features, self.out_features = k, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float())


def _quantized(child: nn.Linear, kind: str) -> nn.Module:
    if kind == "w4" and child.in_features % 32 == 0 and child.out_features % 8 == 0:
        return Int4WeightLinear(child.weight, child.bias)
    if kind == "w4":  # shapes the int4 kernel cannot take stay at 8 bits
        return Int8WeightLinear(child.weight, child.bias, torch.bfloat16)
    return Int8WeightLinear(child.weight, child.bias, activation_dtype(kind))


def convert(model: nn.Module, kind: str) -> nn.Module:
    """Put ``model`` (float32, frozen) into kernel ``kind`` in place; returns it.

    Every ``nn.Linear`` (lm_head included) is replaced for the quantized kinds; the other
    weights take the activation dtype. ``fp32`` leaves the model as it is (weights shared).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kernel '{kind}'; choose one of {KINDS}")
    if activation_dtype(kind) == torch.bfloat16:
        model.to(torch.bfloat16)
    if kind in F16_HEAD:  # the head first: it is no nn.Linear afterwards, so the body skips it
        head = model.get_output_embeddings()
        model.set_output_embeddings(Float16WeightLinear(head.weight, head.bias))
    body = F16_HEAD.get(kind, kind)
    if body in ("w8", "w8f", "w4"):
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, child_name, _quantized(child, body))
    return model


# ---------------------------------------------------------------- choice
def cpu_features() -> dict:
    """What decides the kernels' speed: ATen's kernel level, native bf16, torch version."""
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # older builds lack the probe
        bf16 = False
    return {"aten_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": bf16,
            "torch": torch.__version__,
            "isa_env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                        if k in os.environ}}


def model_shape(model: nn.Module) -> str:
    """e.g. ``LlamaForCausalLM-h576-l30-v49152``: the choice depends on the layer sizes."""
    c = model.config
    return f"{type(model).__name__}-h{c.hidden_size}-l{c.num_hidden_layers}-v{c.vocab_size}"


def cache_key(features: dict, shape: str) -> str:
    isa = features.get("isa_env", {}).get("ONEDNN_MAX_CPU_ISA", "")
    return (f"{features['aten_capability']}{'/' + isa if isa else ''}|bf16={features['native_bf16']}"
            f"|torch={features['torch']}|{shape}")


@dataclass
class Choice:
    """The kernel generation uses here, and why (``bot info`` prints ``reason``)."""

    kind: str
    reason: str
    key: str
    measured: dict = field(default_factory=dict)  # kind -> {"ms_per_token", "ppl_ratio"}
    cached: bool = False
    candidates: list = field(default_factory=list)  # the kinds that were measured


def _cache_path():
    from .assets import cache_dir

    return cache_dir() / CACHE_FILE


def _read_cache() -> dict:
    path = _cache_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:  # a damaged cache is re-measured, not fatal
        log.warning("ignoring unreadable kernel cache %s (%s); it will be rewritten", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, choice: Choice) -> None:
    from .fsutil import atomic_write_text

    data = _read_cache()
    data[key] = {k: v for k, v in asdict(choice).items() if k != "cached"}
    atomic_write_text(_cache_path(), json.dumps(data, indent=2, sort_keys=True) + "\n")


def _prefill(model: nn.Module, ids: torch.Tensor):
    """(perplexity of the probe text, the cache after it, the greedy next token)."""
    out = model(input_ids=ids, use_cache=True)
    logits = out.logits[0, :-1].float()
    ppl = float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp())
    return ppl, out.cache, out.logits[:, -1:].argmax(-1)


def measure(backbone, kinds=CANDIDATES, steps: int = 6) -> dict:
    """Probe perplexity and decode-step time of each kernel on ``backbone``'s base weights.

    Each candidate is the serving engine's model (base weights shared with the backbone
    for fp32, converted once for the others): no merged copy is made just to measure.
    The decode steps of all candidates are interleaved (one step of each, ``steps``
    rounds), so a busy machine slows every candidate alike, and run on one thread.
    """
    from .serve.lora import LoraEngine

    ids = backbone.tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]
    cfg = backbone.base.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit:  # small models (GPT-2 style, tests) have short contexts: leave room to decode
        ids = ids[:, :max(2, limit - steps - 2)]
    state, ppl, times = {}, {}, {}
    threads = torch.get_num_threads()
    # one thread: on a busy machine, threads that wait at every op for a descheduled peer
    # made a step take seconds and favoured the kernels with the fewest ops, not the fastest
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for kind in kinds:
                try:
                    model = LoraEngine(backbone, kind).model
                    ppl[kind], cache, tok = _prefill(model, ids)
                except RuntimeError as err:  # a kernel this torch build or CPU lacks
                    log.info("kernel %s unavailable here: %s", kind, err)
                    continue
                state[kind] = [model, cache, tok]
                times[kind] = []
            for i in range(steps + 1):
                for kind, st in state.items():
                    t0 = time.perf_counter()
                    out = st[0](input_ids=st[2], cache=st[1], use_cache=True)
                    if i:  # the first round warms up allocators and kernels
                        times[kind].append(time.perf_counter() - t0)
                    st[1], st[2] = out.cache, out.logits[:, -1:].argmax(-1)
    finally:
        torch.set_num_threads(threads)
    ref = ppl["fp32"]
    # the fastest step of each: interference from other processes only ever adds time
    return {k: {"ms_per_token": round(min(times[k]) * 1000, 3),
                "ppl_ratio": round(ppl[k] / ref, 4)} for k in state}


def pick(measured: dict) -> tuple[str, str]:
    """The fastest kernel whose probe perplexity is within ``MAX_PPL_RATIO``, and why."""
    base = measured["fp32"]["ms_per_token"]
    ok = {k: v for k, v in measured.items() if v["ppl_ratio"] <= MAX_PPL_RATIO}
    best = min(ok, key=lambda k: ok[k]["ms_per_token"])
    if base / ok[best]["ms_per_token"] < MIN_GAIN:
        best = "fp32"
    rejected = [f"{k} (perplexity {v['ppl_ratio']:.3f}x)" for k, v in measured.items() if k not in ok]
    m = measured[best]
    reason = (f"{best}: {m['ms_per_token']:.1f} ms per decode step vs fp32 {base:.1f} "
              f"({base / m['ms_per_token']:.2f}x), probe perplexity {m['ppl_ratio']:.3f}x fp32")
    others = ", ".join(f"{k} {v['ms_per_token']:.1f}" for k, v in measured.items() if k != best)
    reason += f"; others (ms): {others}"
    if rejected:
        reason += f"; rejected for quality: {', '.join(rejected)}"
    return best, reason


def choose(backbone, *, refresh: bool = False, kinds=CANDIDATES) -> Choice:
    """The kernel for this CPU and backbone: ``BOT_KERNEL``, else cached, else measured now.

    Args:
        backbone: the loaded Backbone (its base weights are measured, never modified).
        refresh: measure again even if a choice is cached for this key.
        kinds: the candidates to measure (float32 is always one).
    """
    features = cpu_features()
    key = cache_key(features, model_shape(backbone.base))
    device = getattr(backbone, "device", torch.device("cpu"))
    if device.type != "cpu":  # these are CPU kernels; GPUs compute bf16 natively
        return Choice("bf16", f"bf16: the backbone is on {device.type}; the measured kernels are CPU kernels", key)
    forced = os.environ.get("BOT_KERNEL", "").strip().lower()
    if forced and forced != "auto":
        if forced not in KINDS:
            from .errors import BotError

            raise BotError(f"BOT_KERNEL={forced} is not a kernel. Fix: set it to one of {KINDS} or 'auto'")
        return Choice(forced, f"{forced}: set by BOT_KERNEL", key)
    wanted = list(dict.fromkeys(("fp32", *kinds)))
    if not refresh:
        hit = _read_cache().get(key)
        # a choice made among other candidates (an older bot) is measured again
        if (isinstance(hit, dict) and hit.get("kind") in KINDS
                and sorted(hit.get("candidates") or []) == sorted(wanted)):
            return Choice(hit["kind"], hit.get("reason", ""), key, hit.get("measured", {}),
                          cached=True, candidates=wanted)
    log.info("measuring generation kernels for %s (once; cached in %s) ...", key, _cache_path())
    t0 = time.perf_counter()
    measured = measure(backbone, kinds=tuple(wanted))
    kind, reason = pick(measured)
    reason += f"; measured in {time.perf_counter() - t0:.1f} s"
    choice = Choice(kind, reason, key, measured, candidates=wanted)
    _write_cache(key, choice)
    return choice
