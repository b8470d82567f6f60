"""Structured output: a grammar every token of a reply must satisfy, enforced per row of a step.

A request may carry a :class:`Grammar` (``SamplingParams.grammar``): a JSON schema, any
JSON object, a regular expression or a list of choices. Each of its replies gets a
:class:`Matcher` that, inside the engine's batched step (``DecodeBatch.accept``), sets the
logits of every token the grammar forbids at that point to -inf before sampling, then
advances on the sampled token. Rows without a grammar are untouched, so constrained and
free requests share every step.

Why llguidance (PyPI ``llguidance``, Rust, no Python dependencies; the engine of vLLM's
``guidance`` structured-output backend, SGLang's ``--grammar-backend llguidance`` and
llama.cpp's LLGuidance build option, per their documentation). Measured here on
SmolLM2's 49,152-token vocabulary (2 shared cores, ``nice -n 19``, a 28-token JSON reply
to a 3-property schema, scripts/grammar_mask_cost.py):

=====================  ===========  ===================  ================================
library                vocab setup  compile (per schema)  mask per token (median / p90)
=====================  ===========  ===================  ================================
llguidance 1.9.1       549-969 ms   4.4-8.7 ms           21-22 us / 95-136 us
xgrammar 0.2.9         254-439 ms   8.5-9.8 ms           5 us / 20-26 us
=====================  ===========  ===================  ================================

(two runs each, 2026-12-06; the first token of a reply costs 2-6 ms in both.)

Both cost well under 1% of a decode step (20-40 ms on 2 cores). xgrammar is faster per
token, but its wheel pulls in triton and apache-tvm-ffi (GPU-oriented; pip installed both
here) and precompiles each schema; llguidance installs as one wheel, computes masks lazily (no
per-schema precompilation to cache) and takes JSON schemas, regular expressions and
Lark grammars through one call. outlines-core 0.2.14 builds a token-level index per schema
before the first token: 80 ms for that schema and 240 ms for a nested one here (its
vocabulary built from the raw byte-level token strings, so the timing is indicative and
its walk of the reply stopped early), a request-path cost 10-80x llguidance's compile for
a server that takes arbitrary schemas per request. The library's own
``apply_token_bitmask_inplace`` took 140-250 ms a call on this CPU (its generic torch path),
so the mask is applied here from llguidance's one-byte-per-token form with one
``masked_fill``: mask and apply together about 100 us a token on one thread (median), so
8 constrained rows add under 1 ms to a 20-40 ms step. End to end, 8 concurrent replies ran
at 96.2 tokens/s constrained against 96.5 free (scripts/structured_bench.py, docs/api.md).

JSON is compact (llguidance's ``whitespace_flexible: false``): no whitespace between
tokens, so a model cannot pad a reply with endless spaces.
"""

from __future__ import annotations

import threading

import torch

from bot.errors import GrammarError

# rust regex metacharacters (llguidance's regexes): escaped to match a choice literally
_REGEX_META = set("\\.+*?()|[]{}^$#&-~")
_JSON_OPTIONS = {"whitespace_flexible": False}
_vocabs: dict[int, tuple[object, object]] = {}
_vocab_lock = threading.Lock()


def _llg():
    import llguidance  # lazy: llguidance is heavy; only once a request asks for structured output

    return llguidance


def vocabulary(tokenizer, n_vocab: int):
    """llguidance's view of ``tokenizer`` over ``n_vocab`` logits (built once: ~0.5 s for 49k)."""
    key = id(tokenizer)
    with _vocab_lock:
        hit = _vocabs.get(key)
        if hit is None or hit[0] is not tokenizer:
            import llguidance.hf  # lazy: llguidance is heavy

            hit = _vocabs[key] = (tokenizer, llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab))
        return hit[1]


class Grammar:
    """One request's constraint, compiled and checked against the vocabulary.

    Build it with :meth:`json_schema`, :meth:`json_object`, :meth:`regex` or :meth:`choice`.
    """

    def __init__(self, tokenizer, n_vocab: int, grammar: str, what: str):
        llg = _llg()
        self.vocab = vocabulary(tokenizer, n_vocab)
        self.n_vocab, self.what = n_vocab, what
        error = llg.LLMatcher.validate_grammar(grammar, self.vocab)
        if error and not error.startswith("WARNING"):
            raise GrammarError(f"{what}: {error.strip().splitlines()[0][:300]}")
        self.grammar = grammar
        self.eos = self.vocab.eos_token

    @classmethod
    def json_schema(cls, tokenizer, n_vocab: int, schema) -> Grammar:
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"the JSON schema must be an object, got {type(schema).__name__}")
        try:
            grammar = _llg().LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except (ValueError, TypeError) as err:
            raise GrammarError(f"the JSON schema cannot be used: {err}") from None
        return cls(tokenizer, n_vocab, grammar, "the JSON schema")

    @classmethod
    def json_object(cls, tokenizer, n_vocab: int) -> Grammar:
        return cls.json_schema(tokenizer, n_vocab, {"type": "object"})

    @classmethod
    def regex(cls, tokenizer, n_vocab: int, pattern: str) -> Grammar:
        try:
            grammar = _llg().LLMatcher.grammar_from_regex(pattern)
        except (ValueError, TypeError) as err:
            raise GrammarError(f"the regular expression cannot be used: {err}") from None
        return cls(tokenizer, n_vocab, grammar, "the regular expression")

    @classmethod
    def choice(cls, tokenizer, n_vocab: int, choices: list[str]) -> Grammar:
        if not choices or any(not isinstance(c, str) or not c for c in choices):
            raise GrammarError("the choices must be a non-empty list of non-empty strings")
        pattern = "|".join("".join("\\" + ch if ch in _REGEX_META else ch for ch in c)
                           for c in choices)
        return cls.regex(tokenizer, n_vocab, f"({pattern})")

    def matcher(self) -> Matcher:
        return Matcher(self)


class Matcher:
    """One reply's position in its grammar: masks logits, advances on each sampled token."""

    def __init__(self, grammar: Grammar):
        self.m = _llg().LLMatcher(grammar.vocab, grammar.grammar)
        self.eos = grammar.eos
        self.n_vocab = grammar.n_vocab

    def allowed(self) -> torch.Tensor:
        """A bool tensor over the vocabulary: the tokens the grammar allows next."""
        bias = torch.frombuffer(bytearray(self.m.compute_logit_bias()), dtype=torch.uint8)
        return bias[:self.n_vocab] != 0

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with every forbidden token at -inf (a copy; the end of text if none is left)."""
        allowed = self.allowed()
        if allowed.shape[0] != logits.shape[0]:  # a tokenizer shorter than the logits row
            allowed = torch.cat([allowed, allowed.new_zeros(logits.shape[0])])[:logits.shape[0]]
        if not bool(allowed.any()):  # an error state: nothing fits, so end the reply
            out = torch.full_like(logits, float("-inf"))
            out[self.eos] = 0.0
            return out
        return logits.masked_fill(~allowed, float("-inf"))

    def consume(self, token: int) -> bool:
        """Advance on ``token``; False when the grammar cannot take it (the reply then ends)."""
        return bool(self.m.consume_token(token))

    def done(self) -> bool:
        """Whether the grammar is complete and allows nothing but the end of text."""
        return bool(self.m.is_stopped())
