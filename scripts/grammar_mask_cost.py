"""Per-token cost of a structured-output mask on the backbone's vocabulary: llguidance vs
xgrammar vs outlines-core.

Issue 27 item 1 (the choice in bot/engine/grammar.py). Walks a fixed 28-token JSON reply
through each library's matcher and times the mask computation before every token, and
times what each needs per schema before the first token. xgrammar and outlines-core are
not dependencies: install them to compare (``pip install xgrammar outlines-core``).

    nice -n 19 .venv/bin/python scripts/grammar_mask_cost.py
"""

from __future__ import annotations

import json
import statistics
import time
from importlib.metadata import version

import torch

from bot.model.backbone import resolve_backbone

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
          "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}
REPLY = json.dumps({"name": "Alice Smith", "age": 42, "tags": ["a", "bb", "hello world"]})


def report(name: str, setup: float, compile_s: float, times: list[float]) -> None:
    times = sorted(times)
    print(f"{name}: vocab setup {setup * 1e3:.0f} ms, compile {compile_s * 1e3:.1f} ms, mask "
          f"median {statistics.median(times) * 1e6:.0f} us, p90 {times[int(len(times) * 0.9)] * 1e6:.0f}"
          f" us, max {times[-1] * 1e6:.0f} us over {len(times)} tokens")


def main() -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(resolve_backbone("SmolLM2-135M-Instruct")[0])
    n_vocab = len(tok)
    ids = tok(REPLY)["input_ids"]
    print(f"vocabulary {n_vocab:,} tokens; reply {len(ids)} tokens")

    import llguidance
    import llguidance.hf

    t = time.perf_counter()
    vocab = llguidance.hf.from_tokenizer(tok, n_vocab=n_vocab)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matcher = llguidance.LLMatcher(vocab, grammar)
    compile_s = time.perf_counter() - t
    times = []
    for i in ids:
        t = time.perf_counter()
        matcher.compute_bitmask()
        times.append(time.perf_counter() - t)
        assert matcher.consume_token(i), matcher.get_error()
    report("llguidance " + version("llguidance"), setup, compile_s, times)

    outlines(tok, ids)
    try:
        import xgrammar as xgr
    except ImportError:
        print("xgrammar: not installed (pip install xgrammar to compare)")
        return
    t = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=n_vocab),
                                   max_threads=1)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    xm = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))
    compile_s = time.perf_counter() - t
    bitmask = xgr.allocate_token_bitmask(1, n_vocab)
    times = []
    for i in ids:
        t = time.perf_counter()
        xm.fill_next_token_bitmask(bitmask, 0)
        times.append(time.perf_counter() - t)
        assert xm.accept_token(i), i
    report("xgrammar " + version("xgrammar"), setup, compile_s, times)


def outlines(tok, ids: list[int]) -> None:
    """outlines-core: a token-level index per schema (built from the raw vocabulary strings)."""
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        print("outlines-core: not installed (pip install outlines-core to compare)")
        return
    eos = tok.eos_token_id
    mapping: dict[str, list[int]] = {}
    for token, i in tok.get_vocab().items():
        if i != eos:
            mapping.setdefault(token, []).append(i)
    t = time.perf_counter()
    vocab = Vocabulary(eos, mapping)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(json.dumps(SCHEMA)), vocab))
    compile_s = time.perf_counter() - t
    times = []
    for i in ids:
        t = time.perf_counter()
        allowed = guide.get_tokens()
        times.append(time.perf_counter() - t)
        if i not in allowed:  # (its regex for JSON differs in whitespace from the reply)
            break
        guide.advance(i)
    report("outlines-core " + version("outlines-core"), setup, compile_s, times)


if __name__ == "__main__":
    main()
