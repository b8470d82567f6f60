"""bot.engine.prefix: a prompt that starts like an earlier one of the same adapter skips that
part of its prefill, and its tokens are the ones a full prefill gives (float32)."""

from __future__ import annotations

import pytest
from helpers import tiny_backbone_with_generators

from bot.engine import SamplingParams, Scheduler
from bot.engine.prefix import PrefixCache

TEMPLATE = "<|system|> You are a helpful assistant. Answer briefly. <|user|> "
QUESTIONS = ["what is a cat?", "tell me about the sea", "why is the sky blue?"]


@pytest.fixture(scope="module")
def bb():
    return tiny_backbone_with_generators()


def _sched(bb, cached: bool = True) -> Scheduler:
    sched = Scheduler(bb, generators=["a", "b"], precision="fp32")
    sched.eos = set()
    if not cached:
        sched.batch.prefixes = None
    return sched


def _ids(bb, text: str) -> list[int]:
    return bb.tokenizer(text)["input_ids"]


def test_a_shared_start_is_prefilled_once_and_the_tokens_do_not_change(bb):
    cached, plain = _sched(bb), _sched(bb, cached=False)
    prompts = [_ids(bb, TEMPLATE + q) for q in QUESTIONS]
    shared = len(_ids(bb, TEMPLATE))
    params = SamplingParams(max_tokens=6)
    for i, ids in enumerate(prompts):
        assert cached.generate_ids(ids, "a", params) == plain.generate_ids(ids, "a", params), i
    store = cached.batch.prefixes
    # the first prompt has nothing to share with, the second teaches the start, the third uses it
    assert store.hits == 1 and shared - 2 <= store.tokens_skipped <= shared + 2
    assert plain.batch.prefixes is None
    cached.close()
    plain.close()


def test_each_adapter_has_its_own_start(bb):
    sched = _sched(bb)
    params = SamplingParams(max_tokens=3)
    sched.generate_ids(_ids(bb, TEMPLATE + QUESTIONS[0]), "a", params)
    sched.generate_ids(_ids(bb, TEMPLATE + QUESTIONS[1]), "a", params)
    sched.generate_ids(_ids(bb, TEMPLATE + QUESTIONS[2]), "b", params)  # b has none stored
    sched.generate_ids(_ids(bb, TEMPLATE + QUESTIONS[2]), None, params)
    assert sched.batch.prefixes.hits == 0
    sched.generate_ids(_ids(bb, TEMPLATE + QUESTIONS[2]), "a", params)
    assert sched.batch.prefixes.hits == 1
    sched.close()


def test_a_growing_conversation_reuses_its_previous_turn(bb):
    cached, plain = _sched(bb), _sched(bb, cached=False)
    params = SamplingParams(max_tokens=4)
    turns = TEMPLATE + QUESTIONS[0]
    skipped = []
    for q in QUESTIONS[1:] + ["and the moon?", "thanks!"]:
        ids = _ids(bb, turns)
        assert cached.generate_ids(ids, "b", params) == plain.generate_ids(ids, "b", params)
        skipped.append(cached.batch.prefixes.tokens_skipped)
        turns += " <|assistant|> ok. <|user|> " + q
    # from the third turn on, each turn skips the turn before last whole: more every time
    gains = [b - a for a, b in zip(skipped, skipped[1:])]
    assert gains[1] > 0 and gains[2] > gains[1], skipped
    cached.close()
    plain.close()


def test_changing_adapters_forgets_every_stored_start(bb):
    sched = _sched(bb)
    params = SamplingParams(max_tokens=2)
    for q in QUESTIONS[:2]:
        sched.generate_ids(_ids(bb, TEMPLATE + q), "a", params)
    assert sched.batch.prefixes.stored
    sched.remove_adapter("b")
    assert not sched.batch.prefixes.stored and not sched.batch.prefixes.last
    sched.close()


class _Rows:
    """A stand-in runner: records what is copied in and out."""

    def __init__(self):
        self.loaded = []

    def save_prefix(self, slot, length):
        return ("kv", slot, length)

    def load_prefix(self, saved, slot, length):
        self.loaded.append((saved, slot, length))


def test_short_starts_are_not_kept_and_the_total_is_bounded():
    rows = _Rows()
    cache = PrefixCache(rows, min_tokens=4, max_tokens=10)
    cache.learn(0, [1, 2, 3, 9], "a")
    cache.learn(1, [1, 2, 3, 8], "a")  # 3 shared tokens: under min_tokens
    assert not cache.stored
    cache.learn(0, [1, 2, 3, 4, 5, 6, 7], "b")
    cache.learn(1, [1, 2, 3, 4, 5, 6, 8], "b")  # 6 shared
    cache.learn(0, [5, 5, 5, 5, 5, 1], "c")
    cache.learn(1, [5, 5, 5, 5, 5, 2], "c")  # 5 more: 11 > 10, the oldest entry goes
    assert list(cache.stored) == ["c"]
    assert cache.restore(3, [5, 5, 5, 5, 5, 7, 7], "c") == 5 and rows.loaded == [(("kv", 1, 5), 3, 5)]
    assert cache.restore(3, [5, 5, 5, 5, 5], "c") == 0  # one prompt token must be left to prefill
    assert cache.restore(3, [5, 5, 5, 5, 4, 1], "c") == 0
