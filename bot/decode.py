"""A lean greedy decode loop for Llama-style engines (the fast path's per-token work).

A profile of one decode step of the w8 engine at batch 1 (SmolLM2-135M, 2 threads) gave
about 64 % of the time to the int8 matmuls and most of the rest to small operations:
transformers' per-layer bookkeeping (mask building, cache concatenation, dtype casts,
rotary embedding per layer) and ``generate()``'s machinery per token (logits processors,
stopping criteria, the full-vocabulary logits copy). This loop does only what greedy
decoding needs:

* q/k/v and gate/up are one matmul each per layer: the fused weights are concatenated
  once and the engine's own q/k/v and gate/up weights become views into them, so no
  memory is added and the engine still runs through transformers (perplexity scoring);
* the key/value cache is allocated once for prompt + reply and written in place;
* the rotary angles are computed once per step, for q and k together;
* the output head runs on the last position only.

The math is transformers' (RMSNorm in float32, rotate-half rotary, scaled dot-product
attention); tests/test_decode.py checks that the greedy tokens equal ``generate()``'s.
Architectures other than the ones in ``SUPPORTED`` keep ``generate()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import Int8WeightLinear

# model types whose decoder layers are exactly Llama's (no sliding window, no extra norms)
SUPPORTED = ("llama", "qwen2")


def supports(model: nn.Module) -> bool:
    """True when :class:`LeanDecoder` reproduces ``model``'s forward pass."""
    cfg = getattr(model, "config", None)
    if cfg is None or cfg.model_type not in SUPPORTED:
        return False
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    inner = getattr(model, "model", None)
    return inner is not None and all(
        hasattr(layer, "self_attn") and hasattr(layer.mlp, "gate_proj") for layer in inner.layers)


class _Fused:
    """Several linear layers over the same input as one matmul; outputs split by ``sizes``."""

    def __init__(self, layers: list[nn.Module]):
        self.sizes = [layer.out_features for layer in layers]
        self.layers = layers
        self.run = None
        if all(type(layer) is nn.Linear for layer in layers):
            self.run = self._fuse_float(layers)
        elif all(type(layer) is Int8WeightLinear for layer in layers):
            self.run = self._fuse_int8(layers)

    @staticmethod
    def _share(fused: torch.Tensor, parts: list[tuple[nn.Module, str]]) -> None:
        """Make each layer's tensor a view of its rows of ``fused`` (no second copy)."""
        start = 0
        for layer, attr in parts:
            old = getattr(layer, attr)
            view = fused[start:start + old.shape[0]]
            if isinstance(old, nn.Parameter):
                setattr(layer, attr, nn.Parameter(view, requires_grad=False))
            else:
                layer.register_buffer(attr, view)
            start += old.shape[0]

    def _fuse_float(self, layers):
        weight = torch.cat([layer.weight for layer in layers])
        self._share(weight, [(layer, "weight") for layer in layers])
        bias = None
        if any(layer.bias is not None for layer in layers):
            bias = torch.cat([layer.bias if layer.bias is not None
                              else weight.new_zeros(layer.out_features) for layer in layers])
        return lambda x: F.linear(x, weight, bias)

    def _fuse_int8(self, layers):
        qweight = torch.cat([layer.qweight for layer in layers])
        scale = torch.cat([layer.scale for layer in layers])
        self._share(qweight, [(layer, "qweight") for layer in layers])
        self._share(scale, [(layer, "scale") for layer in layers])
        act = layers[0].act_dtype
        bias = None
        if any(layer.bias is not None for layer in layers):
            bias = torch.cat([layer.bias if layer.bias is not None
                              else scale.new_zeros(layer.out_features) for layer in layers])

        def run(x):
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(act), qweight, scale)
            y = y.reshape(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        return run

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.run is not None:
            return self.run(x)
        # layers the fused kernels do not cover (int4 packs): one matmul each
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


class _Layer:
    def __init__(self, layer: nn.Module, cfg):
        attn, mlp = layer.self_attn, layer.mlp
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // self.heads
        self.scaling = getattr(attn, "scaling", self.head_dim ** -0.5)
        self.qkv = _Fused([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.gate_up = _Fused([mlp.gate_proj, mlp.up_proj])
        self.inter = mlp.gate_proj.out_features
        self.down = mlp.down_proj
        self.act = mlp.act_fn
        self.norm1 = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.norm2 = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    """transformers' LlamaRMSNorm: statistics in float32, scaled in the input's dtype."""
    weight, eps = norm
    # one fused op for the float32 statistics (bit-identical to the four-op formula in float32)
    return weight * torch.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ly: _Layer) -> torch.Tensor:
    """Attention of one new query over the cache, shape (1, 1, heads, head_dim).

    PyTorch's CPU flash-attention kernel took about 170 us per layer for a single query
    (a third of the int8 matmuls' time); three plain ops take a fraction of that. The
    query heads sharing a key/value head are stacked as rows (grouped-query attention).
    """
    group = ly.heads // ly.kv_heads
    q = q.reshape(1, ly.kv_heads, group, ly.head_dim)
    # float32 throughout, as the flash kernel accumulates (bf16 products here changed tokens)
    weights = torch.softmax((q.float() @ k.float().transpose(2, 3)) * ly.scaling, dim=-1)
    return (weights @ v.float()).to(v.dtype).reshape(1, 1, ly.heads, ly.head_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LeanDecoder:
    """Greedy decoding of one sequence on an engine model (see the module docstring).

    Args:
        model: a frozen engine from bot.fastgen.build_engine (``supports(model)``).
    """

    def __init__(self, model: nn.Module):
        if not supports(model):
            raise ValueError(f"no lean decoder for {type(model).__name__}")
        inner = model.model
        self.model = model
        self.embed = inner.embed_tokens
        self.final_norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.rotary = inner.rotary_emb
        self.head = model.get_output_embeddings()
        self.layers = [_Layer(layer, model.config) for layer in inner.layers]
        self.dtype = self.embed.weight.dtype

    def new_cache(self, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        dev = self.embed.weight.device
        return [(torch.empty(1, ly.kv_heads, length, ly.head_dim, dtype=self.dtype, device=dev),
                 torch.empty(1, ly.kv_heads, length, ly.head_dim, dtype=self.dtype, device=dev))
                for ly in self.layers]

    def forward(self, ids: torch.Tensor, pos: int, cache, every_position: bool = False) -> torch.Tensor:
        """Logits (float32) of the last of ``ids`` (shape (1, T)) placed at ``pos``..``pos+T-1``.

        ``every_position``: logits of every position, shape (1, T, vocab) (to score text).
        """
        t = ids.shape[1]
        x = self.embed(ids)
        positions = torch.arange(pos, pos + t, device=ids.device)[None]
        cos, sin = self.rotary(x, positions)
        cos, sin = cos[:, None], sin[:, None]  # (1, 1, T, head_dim): broadcast over heads
        end = pos + t
        for ly, (k_cache, v_cache) in zip(self.layers, cache):
            h = _rms(x, ly.norm1)
            qkv = ly.qkv(h).view(1, t, ly.heads + 2 * ly.kv_heads, ly.head_dim).transpose(1, 2)
            qk = _rotate(qkv[:, :ly.heads + ly.kv_heads], cos, sin)
            k_cache[:, :, pos:end] = qk[:, ly.heads:]
            v_cache[:, :, pos:end] = qkv[:, ly.heads + ly.kv_heads:]
            if t == 1:
                attn = _attend_one(qk[:, :ly.heads], k_cache[:, :, :end], v_cache[:, :, :end], ly)
            else:
                attn = F.scaled_dot_product_attention(
                    qk[:, :ly.heads], k_cache[:, :, :end], v_cache[:, :, :end], is_causal=pos == 0,
                    scale=ly.scaling, enable_gqa=ly.kv_heads != ly.heads).transpose(1, 2)
            x = x + ly.o_proj(attn.reshape(1, t, ly.heads * ly.head_dim))
            gu = ly.gate_up(_rms(x, ly.norm2))
            x = x + ly.down(ly.act(gu[..., :ly.inter]) * gu[..., ly.inter:])
        return self.head(_rms(x if every_position else x[:, -1], self.final_norm)).float()

    @torch.inference_mode()
    def score(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits at every position of one unpadded sequence (held-out perplexity)."""
        return self.forward(ids, 0, self.new_cache(ids.shape[1]), every_position=True)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, min_new_tokens: int = 0,
                 eos_token_id=None, repetition_penalty: float = 1.0, streamer=None) -> torch.Tensor:
        """Greedy reply of one prompt (``input_ids`` of shape (1, T)); returns the new ids (1, N).

        Same rules as ``generate(do_sample=False)``: ``repetition_penalty`` divides the
        positive (multiplies the negative) logits of every token already in the sequence,
        end-of-sequence ids are masked until ``min_new_tokens``, and the reply stops after
        an end-of-sequence id, which it includes.
        """
        if input_ids.shape[0] != 1:
            raise ValueError("the lean decoder decodes one sequence at a time")
        eos = [] if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        n = input_ids.shape[1]
        cache = self.new_cache(n + max_new_tokens)
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros(self.head.out_features, dtype=torch.bool, device=input_ids.device)
            seen[input_ids[0]] = True
        if streamer is not None:
            streamer.put(input_ids.cpu())
        logits = self.forward(input_ids, 0, cache)
        out: list[int] = []
        for i in range(max_new_tokens):
            scores = logits[0]
            if seen is not None:
                penalised = torch.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty)
                scores = torch.where(seen, penalised, scores)
            if eos and i < min_new_tokens:
                scores = scores.clone()
                scores[eos] = float("-inf")
            tok = int(scores.argmax())
            out.append(tok)
            if streamer is not None:
                streamer.put(torch.tensor([tok]))
            if tok in eos or i + 1 == max_new_tokens:
                break
            if seen is not None:
                seen[tok] = True
            logits = self.forward(torch.tensor([[tok]], device=input_ids.device), n + i, cache)
        if streamer is not None:
            streamer.end()
        return torch.tensor([out], dtype=torch.long)
