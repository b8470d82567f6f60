"""bot.engine: the lean batched step computes transformers' model, alone, batched, chunked, per adapter."""

from __future__ import annotations

import queue

import pytest
import torch
from helpers import tiny_backbone_with_generators

from bot.engine import SamplingParams, Scheduler

PROMPTS = ["hello there", "what is a cat?", "tell me a story about the sea", "hi"]


@pytest.fixture
def bb():
    return tiny_backbone_with_generators()


def _hf_greedy(bb, ids: list[int], adapter, n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        if adapter is None:
            with bb.peft.disable_adapter():
                out = bb.peft.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                       do_sample=False, eos_token_id=None, pad_token_id=0)
        else:
            bb.peft.set_adapter(adapter)
            out = bb.peft.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _run_together(sched, jobs, n):
    done: queue.Queue = queue.Queue()
    reqs = [sched.submit(ids, a, SamplingParams(max_tokens=n), lambda ev: ev.finish_reason and done.put(1))
            for ids, a in jobs]
    for _ in reqs:
        done.get(timeout=120)
    return [list(r.tokens) for r in reqs]


def test_fp32_greedy_tokens_equal_transformers_generate(bb):
    sched = Scheduler(bb, generators=["a", "b"], precision="fp32")
    sched.eos = set()
    assert sched.runner.name == "lean"
    for prompt, adapter in zip(PROMPTS, ("a", "b", None, "a")):
        ids = bb.tokenizer(prompt)["input_ids"]
        got = sched.generate_ids(ids, adapter, SamplingParams(max_tokens=10))
        assert got == _hf_greedy(bb, ids, adapter, 10), (prompt, adapter)
    sched.close()


def test_a_mixed_batch_gives_each_request_its_alone_tokens(bb):
    sched = Scheduler(bb, generators=["a", "b"], precision="fp32")
    sched.eos = set()
    jobs = [(bb.tokenizer(p)["input_ids"], a) for p, a in zip(PROMPTS * 2, ("a", "b", None, "b") * 2)]
    alone = [sched.generate_ids(ids, a, SamplingParams(max_tokens=8)) for ids, a in jobs]
    together = _run_together(sched, jobs, 8)
    assert together == alone
    assert len({str(t) for t in alone[:3]}) == 3  # the adapters change the tokens
    sched.close()


def test_chunked_prefill_equals_whole_prompt_prefill(bb):
    whole = Scheduler(bb, generators=["a"], precision="fp32", prefill_chunk=None)
    chunked = Scheduler(bb, generators=["a"], precision="fp32", prefill_chunk=3)
    for s in (whole, chunked):
        s.eos = set()
    ids = bb.tokenizer(PROMPTS[2] * 3)["input_ids"]
    assert len(ids) > 9  # several chunks
    ref = whole.generate_ids(ids, "a", SamplingParams(max_tokens=8))
    jobs = [(ids, "a"), (bb.tokenizer(PROMPTS[0])["input_ids"], None)]
    got = _run_together(chunked, jobs, 8)
    assert got[0] == ref
    assert got[1] == whole.generate_ids(jobs[1][0], None, SamplingParams(max_tokens=8))
    assert chunked.steps > whole.steps or chunked.steps >= 8
    whole.close()
    chunked.close()


def test_removing_an_adapter_keeps_the_others_exact(bb):
    sched = Scheduler(bb, generators=["a", "b"], precision="fp32")
    sched.eos = set()
    ids = bb.tokenizer(PROMPTS[1])["input_ids"]
    before = sched.generate_ids(ids, "b", SamplingParams(max_tokens=6))
    sched.remove_adapter("a")
    assert sched.generators == ["b"]
    assert sched.generate_ids(ids, "b", SamplingParams(max_tokens=6)) == before
    sched.close()


def test_a_mixed_step_builds_each_bank_layouts_mask_once():
    """The per-step mask is cached per bank layout (30 layers share one layout: one mask)."""
    import torch

    from bot.engine.lora import BankSet, LoraPlan

    banks = BankSet([(6, 4, [0])], n_layers=3, device=torch.device("cpu"))
    for layer in range(3):
        for name in ("x", "y"):
            bank = banks.banks[layer][0]
            if bank is None:
                from bot.engine.lora import LoraBank
                bank = banks.banks[layer][0] = LoraBank(6, 4)
            bank.add(name, [(0, torch.randn(2, 4), torch.randn(6, 2))], 0.5)
    banks.adapters = {"x": 1, "y": 1}
    plan = LoraPlan(banks, ["x", "y", None], {"x", "y"})
    masks = [plan._mask(banks.banks[layer][0]) for layer in range(3)]
    assert all(m is masks[0] for m in masks)  # built once, reused
    assert len(plan._masks) == 1
    assert masks[0][0, :2].tolist() == [0.5, 0.5] and masks[0][0, 2:].tolist() == [0.0, 0.0]
    assert masks[0][2].abs().sum() == 0  # the base row gets no LoRA
