"""Prompt starts kept between requests: a new prompt that begins like an earlier one of the
same adapter skips prefilling that part.

Chat prompts begin with the same template (the embedded SmolLM2's system line and user
header are 27 of a typical 48-token prompt in the serving bench), and a multi-turn chat
sends the whole conversation again every turn. So after each prompt is prefilled, the
start it shares with the previous prompt of the same adapter (at least ``MIN_TOKENS``)
is copied out of the request's cache row; the next prompt of that adapter that begins with
it gets those keys and values copied into its row and prefills only the rest, as a later
chunk (``Segment.pos`` > 0). Keys and values depend on the adapter (LoRA on k/v), so each
adapter (or mixture) has its own entry; any adapter change clears them all.

The copy is exact: a prompt prefilled in two chunks gives the same float32 tokens as
prefilled whole (tests/unit/engine/test_lean.py), and the stored rows are the ones the
first request computed. llama.cpp's server does the same per slot (``cache_prompt``).
"""

from __future__ import annotations

from collections import OrderedDict

MIN_TOKENS = 16  # shorter shared starts are not worth a copy
MAX_TOKENS = 2048  # stored positions over all entries (46 KB each on the embedded backbone)


def _key(adapter) -> str:
    return "" if adapter is None else str(adapter)


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Per adapter: the last prompt seen and one stored shared start with its keys/values.

    Args:
        runner: a runner with ``save_prefix(slot, length)`` and ``load_prefix(saved, slot, length)``.
    """

    def __init__(self, runner, min_tokens: int = MIN_TOKENS, max_tokens: int = MAX_TOKENS):
        self.runner = runner
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self.stored: OrderedDict[str, tuple[list[int], object]] = OrderedDict()
        self.last: dict[str, list[int]] = {}
        self.hits = 0
        self.tokens_skipped = 0

    def clear(self) -> None:
        self.stored.clear()
        self.last.clear()

    def restore(self, slot: int, prompt: list[int], adapter) -> int:
        """Copy the adapter's stored start into row ``slot`` when ``prompt`` begins with it.

        Returns the number of prompt tokens already in the row (0: none). At least one
        prompt token is always left to prefill (its logits give the first reply token).
        """
        key = _key(adapter)
        hit = self.stored.get(key)
        if hit is None:
            return 0
        ids, saved = hit
        n = len(ids)
        if n >= len(prompt) or prompt[:n] != ids:
            return 0
        self.runner.load_prefix(saved, slot, n)
        self.stored.move_to_end(key)
        self.hits += 1
        self.tokens_skipped += n
        return n

    def learn(self, slot: int, prompt: list[int], adapter) -> None:
        """After ``prompt`` is in row ``slot``: keep the start it shares with the adapter's
        previous prompt, if that is longer than the stored one or the stored one no longer fits."""
        key = _key(adapter)
        previous = self.last.get(key)
        self.last[key] = prompt
        if previous is None:
            return
        n = min(_common(previous, prompt), len(prompt) - 1)
        if n < self.min_tokens or n > self.max_tokens:
            return
        hit = self.stored.get(key)
        if hit is not None and len(hit[0]) >= n and prompt[:len(hit[0])] == hit[0]:
            return
        self.stored[key] = (prompt[:n], self.runner.save_prefix(slot, n))
        self.stored.move_to_end(key)
        while sum(len(ids) for ids, _ in self.stored.values()) > self.max_tokens:
            self.stored.popitem(last=False)
