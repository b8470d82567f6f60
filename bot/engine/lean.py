"""The lean batched step: one forward pass over a ragged batch of token segments.

Every caller's tokens in one step (one new token per decoding request, a prompt chunk
per request being prefilled) are laid out as the rows of one (N, hidden) matrix, so
each weight matrix is read once per step whatever the mix. Per layer the step runs
only what a Llama-style decoder needs:

* RMSNorm (statistics in float32) and the residual stream in float32;
* q/k/v and gate/up as one fused matmul each, in the step's kernel
  (:mod:`bot.engine.precision`: float32, bf16, int8 or int4 weight-only);
* each token's LoRA through :class:`bot.engine.lora.LoraBank`: the adapters' A
  matrices stacked, a per-token column mask that carries each adapter's scale (zero
  for the other adapters' columns and for tokens with no adapter), and the stacked B:
  two small matmuls per layer group, skipped when no token of the step uses an adapter
  of that layer (punica's BGMV idea with dense matmuls);
* rotary angles looked up from a table computed once with the model's own rotary
  module (so rope scaling variants are the model's);
* attention in float32 over a cache of one row per request: the single-query tokens of
  the step (decoding rows) in one batched product, each multi-token chunk (prefill)
  through scaled_dot_product_attention over its row's prefix;
* the output head on the rows whose next token is wanted only.

Nothing here walks the transformers module tree per token: the weights are taken out
of the model once (:class:`Weights`) and the step is plain tensor calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bot.engine import native
from bot.engine.precision import activation_dtype, head_kind, linear_for
from bot.engine.slotcache import grow

log = logging.getLogger(__name__)

# model types whose decoder layers are exactly Llama's (no sliding window, no extra norms)
SUPPORTED = ("llama", "qwen2")
# steps of more tokens than this (long prompts prefilled whole) run the Python loop: the
# compiled loop's gain is per op, and a long prefill is all matmul
NATIVE_MAX_TOKENS = 512


def supports(model: nn.Module) -> bool:
    """True when the lean step reproduces ``model``'s forward pass (else: transformers' forward)."""
    cfg = getattr(model, "config", None)
    if cfg is None or cfg.model_type not in SUPPORTED:
        return False
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    inner = getattr(model, "model", None)
    return inner is not None and all(
        hasattr(layer, "self_attn") and hasattr(layer.mlp, "gate_proj") for layer in inner.layers)


def why_not(model: nn.Module) -> str:
    """Why the lean step does not cover ``model`` ('' when it does)."""
    if supports(model):
        return ""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", type(model).__name__)
    if kind in SUPPORTED:
        return f"{kind} with a sliding window or tensor-parallel slices"
    return f"model type '{kind}' (the lean step covers {', '.join(SUPPORTED)})"


@dataclass
class Segment:
    """Consecutive tokens of one request placed at ``pos`` .. ``pos + len(ids) - 1`` of its row."""

    slot: int
    pos: int
    ids: list[int]
    adapter: str | None
    want: bool = True  # logits of the last token are needed (decode, or a prompt's last chunk)


def _fused(layers: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One float32 weight (and bias) for several linear layers over the same input."""
    weight = torch.cat([layer.weight.detach().float() for layer in layers])
    bias = None
    if any(getattr(layer, "bias", None) is not None for layer in layers):
        bias = torch.cat([layer.bias.detach().float() if layer.bias is not None
                          else weight.new_zeros(layer.out_features) for layer in layers])
    return weight, bias


class Weights:
    """One kernel's copy of the decoder's weights, fused, ready for :meth:`LeanModel.step`.

    Args:
        model: the plain (peft-free) float32 model.
        kind: a kernel of bot.engine.precision.KINDS.
    """

    def __init__(self, model: nn.Module, kind: str):
        self.kind = kind
        self.dtype = activation_dtype(kind)
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = linear_for(*_fused([attn.q_proj, attn.k_proj, attn.v_proj]), kind)
            gate_up = linear_for(*_fused([mlp.gate_proj, mlp.up_proj]), kind)
            o = linear_for(attn.o_proj.weight.detach().float(), _bias(attn.o_proj), kind)
            down = linear_for(mlp.down_proj.weight.detach().float(), _bias(mlp.down_proj), kind)
            self.layers.append((qkv, o, gate_up, down))
        head = model.get_output_embeddings()
        self.head = linear_for(head.weight.detach().float(), _bias(head), head_kind(kind))


def _bias(layer: nn.Module) -> torch.Tensor | None:
    b = getattr(layer, "bias", None)
    return None if b is None else b.detach().float()


class KVCache:
    """Per-layer float32 keys and values, shape (rows, kv_heads, capacity, head_dim).

    Row ``slot`` belongs to one request; capacity grows by doubling up to ``max_len``.
    """

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, max_len: int,
                 device, initial: int = 256):
        self.shape = (rows, kv_heads, head_dim)
        self.max_len = max_len
        self.capacity = min(initial, max_len)
        self.device = device
        self.k = [self._new(self.capacity) for _ in range(layers)]
        self.v = [self._new(self.capacity) for _ in range(layers)]

    def _new(self, cap: int) -> torch.Tensor:
        rows, kv, hd = self.shape
        return torch.zeros(rows, kv, cap, hd, device=self.device)

    def ensure(self, needed: int) -> None:
        self.capacity = grow((self.k, self.v), self.capacity, needed, self.max_len)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` positions into row ``dst``."""
        if src != dst and length:
            for buf in (*self.k, *self.v):
                buf[dst, :, :length] = buf[src, :, :length]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (*self.k, *self.v))


class LeanModel:
    """The decoder's fixed parts (norms, embeddings, rotary table) and the lean step.

    Args:
        model: a plain float32 Llama-style model (``supports(model)``); its embedding and
            norm tensors are shared, not copied.
        max_len: the longest sequence (rotary table length).
    """

    def __init__(self, model: nn.Module, max_len: int):
        if not supports(model):
            raise ValueError(f"no lean step for {why_not(model)}")
        cfg = model.config
        inner = model.model
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        attn0 = inner.layers[0].self_attn
        self.head_dim = getattr(attn0, "head_dim", None) or cfg.hidden_size // self.heads
        self.scaling = getattr(attn0, "scaling", self.head_dim ** -0.5)
        self.q_size = self.heads * self.head_dim
        self.kv_size = self.kv_heads * self.head_dim
        self.inter = inner.layers[0].mlp.gate_proj.out_features
        self.act = inner.layers[0].mlp.act_fn
        self.embed = inner.embed_tokens.weight.detach()
        self.norms = [((ly.input_layernorm.weight.detach().float(), ly.input_layernorm.variance_epsilon),
                       (ly.post_attention_layernorm.weight.detach().float(),
                        ly.post_attention_layernorm.variance_epsilon)) for ly in inner.layers]
        self.final_norm = (inner.norm.weight.detach().float(), inner.norm.variance_epsilon)
        self.n_layers = len(inner.layers)
        self.native_norms = [w for pair in self.norms for w, _ in pair]
        self.native_eps = [float(eps) for pair in self.norms for _, eps in pair]
        # the compiled loop (bot.engine.native) covers SiLU MLPs on the CPU
        self.native_ok = (getattr(cfg, "hidden_act", "") in ("silu", "swish")
                          and self.embed.device.type == "cpu" and self.head_dim % 2 == 0)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        dev = self.embed.device
        with torch.inference_mode():
            positions = torch.arange(max_len, device=dev)[None]
            cos, sin = inner.rotary_emb(self.embed[:1][None].float(), positions)
        cos, sin = cos[0].float(), sin[0].float()  # (max_len, head_dim)
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * signed_sin: one roll instead of neg + cat
        self.cos, self.sin = cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        return KVCache(self.n_layers, rows, self.kv_heads, self.head_dim, max_len, self.embed.device)

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def step(self, segments: list[Segment], weights: Weights, cache: KVCache,
             banks=None, every: bool = False) -> torch.Tensor:
        """Run one forward pass over ``segments``; return float32 logits, one row per wanted segment.

        Single-token segments come first (batched attention), then each multi-token one.
        ``banks`` (a bot.engine.lora.BankSet) adds each token's adapter; None = no LoRA.
        ``every``: logits of every token instead, in the step's order (scoring one text).
        """
        singles = [s for s in segments if len(s.ids) == 1]
        chunks = [s for s in segments if len(s.ids) > 1]
        order = singles + chunks
        dev = self.embed.device
        ids = torch.tensor([t for s in order for t in s.ids], device=dev)
        pos_list = [s.pos + i for s in order for i in range(len(s.ids))]
        pos = torch.tensor(pos_list, device=dev)
        slot = torch.tensor([s.slot for s in order for _ in s.ids], device=dev)
        n = ids.shape[0]
        cache.ensure(max(pos_list) + 1)
        x = F.embedding(ids, self.embed).float()
        lora = banks.plan([s.adapter for s in order for _ in s.ids]) if banks else None
        dtype = weights.dtype
        covered = self.native_ok and not every and n <= NATIVE_MAX_TOKENS
        compiled = native.module() if covered and native.weight_args(weights) is not None else None
        if compiled is not None:  # every layer in one compiled call
            try:
                x = self._native_layers(compiled, x, slot, pos, singles, chunks, weights, cache, lora)
            except RuntimeError as err:  # the Python loop redoes the step (same cache positions)
                log.warning("engine: the compiled decode loop failed (%s); the Python loop runs "
                            "from now on", str(err).splitlines()[0][:200])
                self.native_ok = False
                compiled = None
                x = F.embedding(ids, self.embed).float()
        if compiled is None:
            x = self._layers(x, slot, pos, singles, chunks, weights, cache, lora)
        if every:
            return weights.head(_cast(_rms(x, self.final_norm), dtype)).float()
        wanted, end = [], 0
        for s in order:
            end += len(s.ids)
            if s.want:
                wanted.append(end - 1)
        if not wanted:
            return torch.empty(0, self.vocab)
        last = x[torch.tensor(wanted, device=dev)] if len(wanted) != n else x
        logits = weights.head(_cast(_rms(last, self.final_norm), dtype)).float()
        # rows back in the caller's segment order
        back = {id(s): i for i, s in enumerate(s for s in order if s.want)}
        index = [back[id(s)] for s in segments if s.want]
        if index != list(range(len(index))):
            logits = logits[torch.tensor(index, device=logits.device)]
        return logits

    def _native_layers(self, compiled, x, slot, pos, singles, chunks, weights: Weights,
                       cache: KVCache, lora):
        tensors, scales = native.lora_args(lora, self.n_layers)
        spans, start = [], len(singles)
        for s in chunks:
            spans.append((start, len(s.ids), s.pos))
            start += len(s.ids)
        spans = torch.tensor(spans, dtype=torch.long).reshape(-1, 3)
        return compiled.decode_layers(
            x, native.weight_args(weights), self.native_norms, self.native_eps, self.cos[pos],
            self.sin[pos], cache.k, cache.v, slot, pos, tensors, scales, len(singles), spans, self.heads,
            self.kv_heads, self.head_dim, self.inter, self.scaling, weights.dtype == torch.bfloat16)

    def _layers(self, x, slot, pos, singles, chunks, weights: Weights, cache: KVCache, lora):
        """Every decoder layer in Python (any mix of decoding rows and prompt chunks)."""
        n, dev, dtype = x.shape[0], x.device, weights.dtype
        # each token's key/value rows in a layer's cache seen as (rows * kv_heads * capacity, head_dim)
        rows = ((slot[:, None] * self.kv_heads + torch.arange(self.kv_heads, device=dev)[None])
                * cache.capacity + pos[:, None]).reshape(-1)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (N, 1, head_dim)
        single = self._single_plan(singles, dev)
        hq, hk, hd = self.heads, self.kv_heads, self.head_dim
        for li, (qkv_w, o_w, gu_w, down_w) in enumerate(weights.layers):
            n1, n2 = self.norms[li]
            h = _rms(x, n1)  # float32: the LoRA input; the kernel gets it in its dtype
            qkv = qkv_w(_cast(h, dtype)).float()
            if lora is not None:
                lora.add(li, 0, h, qkv)
            qk = _rotate(qkv[:, :self.q_size + self.kv_size].view(n, hq + hk, hd), cos, sin)
            q, k = qk[:, :hq], qk[:, hq:]
            v = qkv[:, self.q_size + self.kv_size:].view(n, hk, hd)
            kc, vc = cache.k[li], cache.v[li]
            kc.view(-1, hd).index_copy_(0, rows, k.reshape(-1, hd))
            vc.view(-1, hd).index_copy_(0, rows, v.reshape(-1, hd))
            attn = self._attend(q, kc, vc, singles, chunks, single)  # float32
            x = x + o_w(_cast(attn, dtype))
            if lora is not None:  # o_proj's LoRA goes straight onto the residual stream
                lora.add(li, 1, attn, x)
            h = _rms(x, n2)
            gu = gu_w(_cast(h, dtype))
            if lora is not None and lora.touches(li, 2):
                gu = gu.float()
                lora.add(li, 2, h, gu)
            a = self.act(gu[:, :self.inter]) * gu[:, self.inter:]
            x = x + down_w(_cast(a, dtype))
            if lora is not None and lora.touches(li, 3):
                lora.add(li, 3, a.float(), x)
        return x

    def _single_plan(self, singles: list[Segment], dev):
        """Rows, key width and additive mask of the step's single-query tokens."""
        if not singles:
            return None
        slots = [s.slot for s in singles]
        width = max(s.pos for s in singles) + 1
        lengths = torch.tensor([s.pos + 1 for s in singles], device=dev)
        mask = torch.zeros(len(singles), width, device=dev)
        mask.masked_fill_(torch.arange(width, device=dev)[None] >= lengths[:, None], float("-inf"))
        contiguous = slots == list(range(len(slots)))
        rows = None if contiguous else torch.tensor(slots, device=dev)
        return rows, width, mask[:, None, None, :]

    def _attend(self, q, kc, vc, singles, chunks, single) -> torch.Tensor:
        hq, hk, hd = self.heads, self.kv_heads, self.head_dim
        group = hq // hk
        outs = []
        if singles:
            rows, width, mask = single
            b = len(singles)
            keys = kc[:b, :, :width] if rows is None else kc[rows, :, :width]
            vals = vc[:b, :, :width] if rows is None else vc[rows, :, :width]
            if b == 1:  # one row sees its whole prefix: no mask, and the fused kernel is faster
                out = F.scaled_dot_product_attention(q[:1].reshape(1, hq, 1, hd), keys, vals,
                                                     scale=self.scaling, enable_gqa=hk != hq)
                outs.append(out.reshape(1, hq * hd))
            else:
                qs = q[:b].reshape(b, hk, group, hd)
                scores = torch.matmul(qs, keys.transpose(2, 3)).mul_(self.scaling).add_(mask)
                outs.append(torch.matmul(torch.softmax(scores, dim=-1), vals).reshape(b, hq * hd))
        start = len(singles)
        for s in chunks:
            t = len(s.ids)
            end = s.pos + t
            qc = q[start:start + t].transpose(0, 1)[None]  # (1, heads, t, head_dim)
            keys, vals = kc[s.slot:s.slot + 1, :, :end], vc[s.slot:s.slot + 1, :, :end]
            if s.pos == 0:
                out = F.scaled_dot_product_attention(qc, keys, vals, is_causal=True,
                                                     scale=self.scaling, enable_gqa=hk != hq)
            else:  # a later chunk: every cached position, then causal within the chunk
                allowed = (torch.arange(end, device=q.device)[None]
                           <= torch.arange(s.pos, end, device=q.device)[:, None])
                out = F.scaled_dot_product_attention(qc, keys, vals, attn_mask=allowed,
                                                     scale=self.scaling, enable_gqa=hk != hq)
            outs.append(out[0].transpose(0, 1).reshape(t, hq * hd))
            start += t
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    """RMSNorm of the float32 residual, float32 (one fused op, weight included)."""
    weight, eps = norm
    return torch.rms_norm(x, (x.shape[-1],), weight, eps)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (transformers' rotate-half layout) of (N, heads, head_dim)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
