"""Turn embeddings: unit-length rows from the encoder, with an LRU cache of recent turns."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
from tqdm.auto import tqdm

from bot.util.text import MAX_CHARS

PROGRESS_MIN = 2000  # texts: below this, embedding takes seconds and shows no progress bar


class Embedder:
    """Embed texts with ``encoder``; remember the last ``cache_size`` single turns.

    Args:
        encoder: needs ``encode(list[str], normalize_embeddings=True) -> array``.
        max_chars: text is cut to this many characters before tokenising (the encoder keeps
            only its first 128 tokens anyway, and tokenising a whole article would cost more
            than the routing itself).
        cache_size: turns kept (repeated turns and retries are common in chat).
    """

    def __init__(self, encoder, max_chars: int = MAX_CHARS, cache_size: int = 1024):
        self.encoder = encoder
        self.max_chars = int(max_chars)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = int(cache_size)
        self._lock = threading.Lock()  # the demo may route from several threads

    def encode(self, texts: list[str], progress: str | None = None) -> np.ndarray:
        """Embed texts as unit-length float32 rows (no cache).

        Args:
            progress: a progress-bar label, shown when there are more than PROGRESS_MIN texts
                (building a router embeds thousands). The texts go to the encoder longest
                first, in whole multiples of its batch size, so the batches (and the vectors:
                an int8 encoder's rows depend on their batch) are those of a single call.
        """
        clipped = [t[: self.max_chars] for t in texts]
        if progress and len(clipped) > PROGRESS_MIN:
            order = sorted(range(len(clipped)), key=lambda i: -len(clipped[i]))
            step = int(getattr(self.encoder, "batch_size", 32) or 32) * 16
            parts = []
            with tqdm(total=len(order), desc=progress, unit="text") as bar:
                for start in range(0, len(order), step):
                    parts.append(self._vectors([clipped[i] for i in order[start:start + step]]))
                    bar.update(len(parts[-1]))
            vectors = np.empty((len(clipped), parts[0].shape[1]), dtype=np.float32)
            vectors[order] = np.concatenate(parts)
        else:
            vectors = self._vectors(clipped)
        # Normalise again: not every encoder honours normalize_embeddings.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)

    def _vectors(self, texts: list[str]) -> np.ndarray:
        return np.asarray(
            self.encoder.encode(texts, normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False),
            dtype=np.float32,
        ).reshape(len(texts), -1)

    def embed_one(self, text: str) -> np.ndarray:
        """Embed one turn, reusing the cache."""
        key = text[: self.max_chars]
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        vector = self.encode([key])[0]
        self._remember(key, vector)
        return vector

    def prime(self, texts: list[str]) -> None:
        """Embed uncached texts in batches of 64 (much faster than one at a time)."""
        keys = dict.fromkeys(t[: self.max_chars] for t in texts)
        todo = [key for key in keys if key not in self._cache]
        for start in range(0, len(todo), 64):
            chunk = todo[start:start + 64]
            for key, vector in zip(chunk, self.encode(chunk), strict=True):
                self._remember(key, vector)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def _remember(self, key: str, vector: np.ndarray) -> None:
        with self._lock:
            self._cache[key] = vector
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
