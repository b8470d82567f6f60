"""A sentence encoder called directly: tokenizer -> transformer -> mean pooling -> unit length.

``SentenceTransformer.encode`` spends several milliseconds per call on bookkeeping (feature
dicts, length sorting, device moves, the module pipeline) that a router turn, one short text at a
time, does not need. ``DirectEncoder`` runs the same steps itself under ``torch.inference_mode``
and gives the same vectors as ``encode(..., normalize_embeddings=True)`` (tests/unit/routing/test_fastenc.py
checks to 1e-5). It refuses any model that is not "one Transformer, mean pooling, optional
Normalize", so a different pipeline can never be encoded wrongly.

``int8=True`` quantizes the transformer's linear layers to int8 (torch dynamic quantization,
one weight scale per output row):
at batch size 1 the fp32 weights (about 42 MB) are read from memory on every call, and a quarter
of that is read instead. The vectors then differ slightly from fp32 ones, so a router fitted with
one must be loaded with the same one (``name_hint`` carries the setting; build_router keys its
cache on it).
"""

from __future__ import annotations

import copy
import threading
import warnings

import numpy as np
import torch

from bot.errors import DataError


def mean_pooling_only(model) -> bool:
    names = [type(m).__name__ for m in model]
    if names[:2] != ["Transformer", "Pooling"] or names[2:] not in ([], ["Normalize"]):
        return False
    pooling = model[1]
    mode = getattr(pooling, "pooling_mode", None)
    if mode is not None:  # sentence-transformers >= 5 stores one mode name
        return mode in ("mean", ["mean"], ("mean",))
    return bool(getattr(pooling, "pooling_mode_mean_tokens", False)) and not any(
        getattr(pooling, flag, False) for flag in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                                   "pooling_mode_mean_sqrt_len_tokens"))


class DirectEncoder:
    """``encode(texts, normalize_embeddings=True)`` of a mean-pooling SentenceTransformer, direct.

    Args:
        model: a loaded SentenceTransformer (Transformer, mean Pooling, optional Normalize).
        int8: quantize the linear layers to int8 (faster at batch 1, slightly different vectors).
        batch_size: texts per forward pass when many are encoded at once.
    """

    def __init__(self, model, int8: bool = False, batch_size: int = 64):
        if not mean_pooling_only(model):
            raise DataError(f"DirectEncoder needs a Transformer + mean Pooling model, got "
                            f"{[type(m).__name__ for m in model]}. Fix: use the SentenceTransformer "
                            f"itself as the router's encoder")
        self.tokenizer = model.tokenizer
        self.max_seq_length = int(model.max_seq_length)
        transformer = model[0].auto_model.eval()
        if int8:
            with warnings.catch_warnings():  # the eager API warns that it is moving to torchao
                warnings.simplefilter("ignore")
                # one scale per output row: cosine to the exact vectors 0.91-0.99 on test
                # turns, where one scale per matrix gave 0.84-0.96
                transformer = torch.ao.quantization.quantize_dynamic(
                    copy.deepcopy(transformer),
                    {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig})
        self.transformer = transformer
        self.int8 = bool(int8)
        self.batch_size = int(batch_size)
        self.name_hint = getattr(model, "name_hint", "encoder") + ("|int8-rows" if int8 else "")
        self._torch = torch
        # the tokenizer's padding/truncation settings are shared state (see Backbone.encode)
        self._tok_lock = threading.Lock()

    def encode(self, texts, normalize_embeddings: bool = True, convert_to_numpy: bool = True,
               batch_size: int | None = None, **_unused) -> np.ndarray:
        """Embeddings (len(texts), dim) as float32, unit length when ``normalize_embeddings``."""
        texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
        size = batch_size or self.batch_size
        # Similar lengths in one batch waste less padding; the order is restored below.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), self.transformer.config.hidden_size), dtype=np.float32)
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            out[rows] = self._forward([texts[i] for i in rows], normalize_embeddings)
        return out

    def _forward(self, texts: list[str], normalize: bool) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            with self._tok_lock:
                batch = self.tokenizer(texts, padding=True, truncation="longest_first",
                                       max_length=self.max_seq_length, return_tensors="pt")
            hidden = self.transformer(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vectors = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            if normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            return vectors.float().numpy()
