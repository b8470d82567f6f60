"""The kernel autotuner: which kernels the engine's step uses here, measured once and cached.

See bot.engine.precision for the kernels and why a step of one token and a step of
many want different ones. ``choose`` measures each candidate's lean step on the loaded
backbone's base weights at 1, 4, 8 and 16 tokens (interleaved, fastest of several
rounds, so a busy machine slows every candidate alike), gates each on the probe text's
perplexity, and keeps the fastest at 1 token (``small``), the fastest at 16
(``large``) and the largest step size at which ``small`` still wins (``threshold``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from bot import settings
from bot.engine.plain import plain_model
from bot.engine.precision import (
    CACHE_FILE,
    CANDIDATES,
    KERNEL_ENV,
    KINDS,
    MAX_PPL_RATIO,
    MIN_GAIN,
    PROBE_TEXT,
    native_bf16,
)
from bot.errors import BotError
from bot.util.assets import cache_dir
from bot.util.fsutil import atomic_write_text

log = logging.getLogger(__name__)
SIZES = (1, 4, 8, 16)
SCHEMA = 2  # cached choices of an older layout are measured again


@dataclass
class Choice:
    """The kernels generation uses here, and why (``bot info`` prints ``reason``)."""

    small: str
    large: str
    threshold: int  # steps of at most this many tokens use ``small``
    reason: str
    key: str = ""
    measured: dict = field(default_factory=dict)  # kind -> {"ms": {tokens: ms}, "ppl_ratio"}
    cached: bool = False
    candidates: list = field(default_factory=list)

    @property
    def kind(self) -> str:
        """One name for the pair (``w8`` or ``w8,bf16``)."""
        return self.small if self.small == self.large else f"{self.small},{self.large}"


def cpu_features() -> dict:
    """What decides the kernels' speed: ATen's kernel level, native bf16, torch version."""
    return {"aten_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(),
            "torch": torch.__version__,
            "isa_env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                        if k in os.environ}}


def model_shape(model) -> str:
    """e.g. ``LlamaForCausalLM-h576-l30-v49152``: the choice depends on the layer sizes."""
    c = model.config
    return f"{type(model).__name__}-h{c.hidden_size}-l{c.num_hidden_layers}-v{c.vocab_size}"


def cache_key(features: dict, shape: str, step: str = "python") -> str:
    """``step``: the lean step's layer loop the kernels were timed in (``compiled``: the
    bot.engine.native loop, whose lower per-op cost can change which kernel wins)."""
    isa = features.get("isa_env", {}).get("ONEDNN_MAX_CPU_ISA", "")
    return (f"{features['aten_capability']}{'/' + isa if isa else ''}|bf16={features['native_bf16']}"
            f"|torch={features['torch']}|{shape}|step={step}")


def parse(precision: str) -> tuple[str, str] | None:
    """``"w8"`` -> (w8, w8); ``"w8,bf16"`` -> (w8, bf16); ``"auto"``/empty -> None."""
    text = (precision or "auto").strip().lower()
    if text == "auto":
        return None
    parts = [p.strip() for p in text.split(",")]
    bad = [p for p in parts if p not in KINDS]
    if bad or len(parts) not in (1, 2):
        raise BotError(f"'{precision}' is not a kernel. Fix: use 'auto', one of {KINDS}, or "
                       "'small,large' (two of them, e.g. w8,bf16)")
    return parts[0], parts[-1]


def resolve(backbone, precision: str = "auto") -> Choice:
    """The Choice for ``precision`` ("auto": ``BOT_KERNEL``, else cached, else measured)."""
    pair = parse(precision)
    return choose(backbone) if pair is None else _forced(pair, f"{precision}: set by the caller")


def _forced(pair: tuple[str, str], reason: str, key: str = "") -> Choice:
    """A Choice nobody measured: ``small`` for single-token steps, ``large`` above."""
    return Choice(pair[0], pair[1], 1 if pair[0] != pair[1] else 1 << 30, reason, key)


def _cache_path():
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
    data = _read_cache()
    data[key] = {**{k: v for k, v in asdict(choice).items() if k != "cached"}, "schema": SCHEMA}
    atomic_write_text(_cache_path(), json.dumps(data, indent=2, sort_keys=True) + "\n")


def measure(backbone, kinds=CANDIDATES, rounds: int = 5) -> dict:
    """Probe perplexity and lean-step time (ms at 1/4/8/16 tokens) of each kernel."""
    # lazy: bot.engine.lean imports transformers
    from bot.engine.lean import LeanModel, Segment, Weights

    ids = backbone.tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"][0].tolist()
    cfg = backbone.base.config
    limit = getattr(cfg, "max_position_embeddings", None) or 4096
    ids = ids[:max(2, min(len(ids), limit - 8))]
    model = plain_model(backbone)
    lean = LeanModel(model, min(limit, len(ids) + 8))
    pos = len(ids)
    cache = lean.new_cache(max(SIZES), pos + 2)
    probe = torch.tensor(ids[1:])
    weights, ppl, times = {}, {}, {}
    with torch.inference_mode():
        for kind in kinds:
            try:
                w = Weights(model, kind)
                logits = lean.step([Segment(0, 0, ids, None)], w, cache, every=True)
            except RuntimeError as err:  # a kernel this torch build or CPU lacks
                log.info("kernel %s unavailable here: %s", kind, err)
                continue
            ppl[kind] = math.exp(float(torch.nn.functional.cross_entropy(logits[:-1], probe)))
            weights[kind] = w
            times[kind] = {n: [] for n in SIZES}
        for i in range(rounds + 1):
            for n in SIZES:
                segs = [Segment(r, pos - 1, [ids[-1]], None) for r in range(n)]
                for kind, w in weights.items():
                    t0 = time.perf_counter()
                    lean.step(segs, w, cache)
                    if i:  # the first round warms up allocators and kernels
                        times[kind][n].append(time.perf_counter() - t0)
    ref = ppl["fp32"]
    return {k: {"ms": {str(n): round(min(v) * 1000, 3) for n, v in times[k].items()},
                "ppl_ratio": round(ppl[k] / ref, 4)} for k in weights}


def pick(measured: dict) -> tuple[str, str, int, str]:
    """(small, large, threshold, reason) from ``measure``'s figures."""
    ok = {k: v for k, v in measured.items() if v["ppl_ratio"] <= MAX_PPL_RATIO}

    def best(n: int) -> str:
        kind = min(ok, key=lambda k: ok[k]["ms"][str(n)])
        # the exact kernel unless the gain is clear of timing noise
        return kind if ok["fp32"]["ms"][str(n)] / ok[kind]["ms"][str(n)] >= MIN_GAIN else "fp32"

    small, large = best(SIZES[0]), best(SIZES[-1])
    threshold = SIZES[0]
    for n in SIZES[1:]:
        if ok[small]["ms"][str(n)] <= ok[large]["ms"][str(n)]:
            threshold = n
    if small == large:
        threshold = 1 << 30
    f = measured["fp32"]["ms"]
    s, g = measured[small]["ms"], measured[large]["ms"]
    reason = (f"{small} for 1 token ({s['1']:.1f} ms per step vs fp32 {f['1']:.1f}, "
              f"{f['1'] / s['1']:.2f}x), {large} for 16 ({g['16']:.1f} ms vs fp32 {f['16']:.1f}, "
              f"{f['16'] / g['16']:.2f}x)")
    if small != large:
        reason += f"; {small} up to {threshold} tokens per step"
    others = ", ".join(f"{k} {v['ms']['1']:.1f}/{v['ms']['16']:.1f}" for k, v in measured.items())
    reason += f"; all (ms at 1/16 tokens): {others}"
    rejected = [f"{k} (perplexity {v['ppl_ratio']:.3f}x)" for k, v in measured.items() if k not in ok]
    if rejected:
        reason += f"; rejected for quality: {', '.join(rejected)}"
    return small, large, threshold, reason


def choose(backbone, *, refresh: bool = False, kinds=CANDIDATES) -> Choice:
    """The kernels for this CPU and backbone: ``BOT_KERNEL``, else cached, else measured now.

    Args:
        backbone: the loaded Backbone (its base weights are measured, never modified).
        refresh: measure again even if a choice is cached for this key.
        kinds: the candidates to measure (float32 is always one).
    """
    from bot.engine import native  # lazy: bot.engine.lean (below) imports transformers
    from bot.engine.lean import supports, why_not

    device = getattr(backbone, "device", torch.device("cpu"))
    compiled = device.type == "cpu" and supports(backbone.base) and native.module() is not None
    key = cache_key(cpu_features(), model_shape(backbone.base), "compiled" if compiled else "python")

    if not supports(backbone.base) and not settings.get(KERNEL_ENV):
        return Choice("fp32", "fp32", 1 << 30, f"fp32: the autotuner times the lean step, which does "
                      f"not cover {why_not(backbone.base)}; transformers' forward runs exact float32 "
                      f"(set {KERNEL_ENV} or --precision to choose another kernel)", key)
    if device.type != "cpu":  # these are CPU kernels; GPUs compute bf16 natively
        return Choice("bf16", "bf16", 1 << 30,
                      f"bf16: the backbone is on {device.type}; the measured kernels are CPU kernels", key)
    forced = (settings.get(KERNEL_ENV) or "").lower()
    if forced and forced != "auto":
        try:
            pair = parse(forced)
        except BotError as err:
            raise BotError(f"{KERNEL_ENV}={forced}: {err}") from None
        return _forced(pair, f"{forced}: set by {KERNEL_ENV}", key)
    wanted = list(dict.fromkeys(("fp32", *kinds)))
    if not refresh:
        hit = _read_cache().get(key)
        if (isinstance(hit, dict) and hit.get("schema") == SCHEMA and hit.get("small") in KINDS
                and hit.get("large") in KINDS and sorted(hit.get("candidates") or []) == sorted(wanted)):
            return Choice(hit["small"], hit["large"], int(hit["threshold"]), hit.get("reason", ""),
                          key, hit.get("measured", {}), cached=True, candidates=wanted)
    log.info("measuring generation kernels for %s (once; cached in %s) ...", key, _cache_path())
    t0 = time.perf_counter()
    measured = measure(backbone, kinds=tuple(wanted))
    small, large, threshold, reason = pick(measured)
    reason += f"; measured in {time.perf_counter() - t0:.1f} s"
    choice = Choice(small, large, threshold, reason, key, measured, candidates=wanted)
    _write_cache(key, choice)
    return choice
