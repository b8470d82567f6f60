"""A key/value cache with one row ("slot") per in-flight request, each at its own length.

Continuous batching needs requests of different lengths to decode in one forward
pass. Rows are kept compact (rows ``0..n-1`` are the live requests), so attention
reads a view of the buffers, never a gathered copy; a finished request's row is
filled by moving the last row into it. Each row writes its new keys at its own
position, and a boolean mask hides everything past each row's length, so padding
never reaches a real token. The buffers grow by doubling, up to the context limit.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotCache(Cache):
    """Per-layer key/value buffers of shape (rows, kv_heads, capacity, head_dim).

    Before each forward pass the scheduler calls :meth:`plan_decode` or
    :meth:`plan_prefill`; the model's attention layers then call :meth:`update`.

    Args:
        max_rows: the most requests decoding at once.
        max_len: the context limit (prompt + generated tokens) per request.
    """

    def __init__(self, max_rows: int, max_len: int, initial: int = 256):
        super().__init__(layers=[])
        self.max_rows = max_rows
        self.max_len = max_len
        self.capacity = min(initial, max_len)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._rows = slice(0, 0)
        self._pos: torch.Tensor | None = None  # decode: write position per row
        self._width = 0  # key length the attention sees after this update

    # ---------------------------------------------------------------- plans
    def plan_decode(self, lengths: list[int]) -> None:
        """Rows ``0..len(lengths)-1`` each append one token at position ``lengths[i]``."""
        self._ensure(max(lengths) + 1)
        self._rows = slice(0, len(lengths))
        self._pos = torch.tensor(lengths)
        self._width = max(lengths) + 1

    def plan_prefill(self, first_row: int, width: int) -> None:
        """Rows ``first_row..`` receive (right-padded) prompts of ``width`` tokens from 0."""
        self._ensure(width)
        self._pos = None
        self._width = width
        self._first = first_row

    def _ensure(self, needed: int) -> None:
        self.capacity = grow((self.keys, self.values), self.capacity, needed, self.max_len)

    # ------------------------------------------------------- Cache protocol
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == len(self.keys):  # first call for this layer: allocate
            shape = (self.max_rows, key_states.shape[1], self.capacity, key_states.shape[3])
            self.keys.append(key_states.new_zeros(shape))
            self.values.append(value_states.new_zeros(shape))
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self._pos is not None:  # decode: one new token per row, each at its own position
            rows = torch.arange(key_states.shape[0], device=k.device)
            pos = self._pos.to(k.device)
            k[rows, :, pos] = key_states[:, :, 0]
            v[rows, :, pos] = value_states[:, :, 0]
            return k[self._rows, :, :self._width], v[self._rows, :, :self._width]
        n, width = key_states.shape[0], key_states.shape[2]
        rows = slice(self._first, self._first + n)
        k[rows, :, :width] = key_states
        v[rows, :, :width] = value_states
        return k[rows, :, :width], v[rows, :, :width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._width

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` positions into row ``dst`` (compaction)."""
        if src == dst:
            return
        for store in (self.keys, self.values):
            for buf in store:
                buf[dst, :, :length] = buf[src, :, :length]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.keys + self.values)


def decode_mask(lengths: list[int]) -> torch.Tensor:
    """(rows, 1, 1, width) boolean mask: row i attends to positions 0..lengths[i]."""
    width = max(lengths) + 1
    pos = torch.arange(width)
    return (pos[None, :] <= torch.tensor(lengths)[:, None])[:, None, None, :]


def prefill_mask(lengths: list[int]) -> torch.Tensor:
    """(rows, 1, width, width) causal mask that also hides each row's right padding."""
    width = max(lengths)
    pos = torch.arange(width)
    causal = pos[None, :] <= pos[:, None]
    real = pos[None, :] < torch.tensor(lengths)[:, None]
    return (causal[None] & real[:, None, :])[:, None]


def grow(stores, capacity: int, needed: int, max_len: int) -> int:
    """The capacity for ``needed`` positions (doubling, at most ``max_len``).

    Every buffer (rows, heads, capacity, head_dim) in ``stores`` (lists, replaced in place)
    is regrown to it, keeping what it held.
    """
    if needed > max_len:
        raise ValueError(f"sequence of {needed} tokens exceeds the context limit {max_len}")
    if needed <= capacity:
        return capacity
    new = min(max_len, max(needed, 2 * capacity))
    for store in stores:
        for i, buf in enumerate(store):
            grown = buf.new_zeros(buf.shape[0], buf.shape[1], new, buf.shape[3])
            grown[:, :, :capacity] = buf[:, :, :capacity]
            store[i] = grown
    return new
