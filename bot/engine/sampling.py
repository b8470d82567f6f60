"""Per-request sampling: greedy, temperature, top-p, repetition penalty and a seed.

Each request carries its own ``torch.Generator``, so a seeded request draws the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20  # top alternatives per token at most (vLLM's default max_logprobs is 20)


@dataclass
class SamplingParams:
    """What one request asks of the decoder (OpenAI's names).

    Args:
        max_tokens: new tokens at most.
        temperature: 0 = greedy.
        top_p: nucleus sampling mass (1 = off).
        stop: strings that end the reply (not included in it).
        seed: makes sampling repeatable.
        repetition_penalty: >1 discourages repeating tokens already seen (1 = off).
        logprobs: None = none; k >= 0 = each generated token's log-probability and the ``k``
            most likely alternatives (from the model's raw logits, as vLLM's default
            ``raw_logprobs``: before penalties, temperature and any grammar mask).
        grammar: a structured-output constraint (bot.engine.grammar.Grammar) every token
            must satisfy, or None.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    grammar: object | None = None

    def check(self) -> None:
        """Raise ValueError naming the field when a value is out of range."""
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for name, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0),
                             ("repetition_penalty", 0.5, 2.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
        if self.top_p == 0:
            raise ValueError("top_p must be > 0")
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a string or a list of at most 4 non-empty strings")
        if self.logprobs is not None and not (isinstance(self.logprobs, int)
                                              and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got "
                             f"{self.logprobs!r}")

    def generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        return gen


def top_logprobs(logits: torch.Tensor, tok: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``tok`` and the ``k`` most likely tokens with theirs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top: list[tuple[int, float]] = []
    if k:
        values, ids = torch.topk(logp, k)
        top = list(zip(ids.tolist(), values.tolist()))
    return float(logp[tok]), top


def next_token(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
               gen: torch.Generator | None) -> int:
    """Pick one token from a row of logits (float32, shape (vocab,))."""
    if params.repetition_penalty != 1.0 and seen.numel():
        picked = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty,
                                   picked * params.repetition_penalty)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=gen))
