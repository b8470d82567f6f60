"""``/v1/embeddings``: which vectors each ``model`` name gives, and where they are computed.

* ``router-encoder``: the router's sentence encoder (all-MiniLM-L6-v2, mean pooling,
  unit length; it reads a text's first 128 tokens, as routing does). It runs in the
  request's worker thread, whose OpenMP team is released afterwards
  (bot.engine.threads.off_engine: a second team slows every decode step).
* the base model's name, or any adapter's (generation or classify): the backbone's final
  hidden states averaged over the text's real tokens with that adapter active (none for
  the base model), then scaled to unit length. These passes run on the engine thread
  between decode steps, in the classify queue's slices (bot.engine.scheduler.embed_now).
"""

from __future__ import annotations

import copy
import threading

from bot.engine.threads import off_engine
from bot.errors import FieldError, UnknownModel
from bot.serve.state import ServerState, _shown

ROUTER_ENCODER = "router-encoder"
_counters: dict[int, tuple[object, object]] = {}  # id(encoder) -> (encoder, its tokenizer's copy)
_counter_lock = threading.Lock()


def _encoder_tokens(encoder, texts: list[str]) -> int:
    """Tokens the encoder reads of ``texts`` (at most its max_seq_length each).

    Counted with a private copy of its tokenizer: a fast tokenizer keeps its truncation
    setting as shared state, and a call without it could switch it off under the
    encoder's own concurrent call.
    """
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is None:  # (a test's stand-in encoder)
        return 0
    limit = getattr(encoder, "max_seq_length", None) or 128
    with _counter_lock:
        hit = _counters.get(id(encoder))
        if hit is None or hit[0] is not encoder:
            hit = _counters[id(encoder)] = (encoder, copy.deepcopy(tokenizer))
        return sum(min(len(ids), limit) for ids in hit[1](texts)["input_ids"])


def embedding_models(state: ServerState) -> list[str]:
    """Names /v1/embeddings takes: the router's encoder, the base model, every adapter."""
    return [*([ROUTER_ENCODER] if state.router is not None else []), state.base_name,
            *state.tasks, *(g for g in state.scheduler.generators if g not in state.tasks)]


def embed(state: ServerState, model: str, texts: list[str], cancelled=None) -> tuple[list, int]:
    """Unit-length embeddings of ``texts`` by ``model`` and the tokens read. Blocking."""
    if model == ROUTER_ENCODER and state.router is not None:
        encoder = state.router.encoder
        with off_engine():
            vectors = encoder.encode(texts, normalize_embeddings=True)
        return [list(map(float, v)) for v in vectors], _encoder_tokens(encoder, texts)
    if model not in embedding_models(state):
        raise UnknownModel(f"model '{_shown(model)}' cannot embed: it does not exist; "
                           f"embedding models: {embedding_models(state)}")
    adapter = None if model == state.base_name or state.is_base(model) else model
    counts = [len(ids) for ids in state.token_ids(texts)]
    limit = state.scheduler.max_len
    long = next((i for i, n in enumerate(counts) if n > limit), None)
    if long is not None:
        raise FieldError(f"input text {long} has {counts[long]:,} tokens, over the context "
                         f"limit of {limit} tokens. Fix: shorten it or split it",
                         "input", code="context_length_exceeded")
    vectors = state.scheduler.embed(texts, [adapter] * len(texts), limit, cancelled=cancelled)
    return [v.tolist() for v in vectors], sum(counts)
