"""The engine's scheduler (bot.engine.Scheduler) on a tiny random model: continuous batching,
multi-LoRA rows, cancelling, refusals, seeded sampling and chat sessions sharing batches.

The HTTP API over it is tested in tests/unit/serve/.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch
from helpers import run_concurrently, spread_backbone
from peft import LoraConfig

from bot.engine import SamplingParams, Scheduler
from bot.errors import QueueFull, ServeError, UnknownModel
from bot.manifests.spec import AdapterSpec
from bot.model.backbone import Backbone
from bot.tasks.classify import ClassifyTask

PROMPTS = ["hello there", "what is the weather like today in paris?", "x",
           "a much longer prompt that goes on and on for quite a while, with commas",
           "short one", "numbers 1 2 3 4 5 6 7 8 9"]


def hf_greedy(bb: Backbone, prompt_ids: list[int], adapter: str | None, n: int) -> list[int]:
    """The reference: transformers' own generate() through peft, one request alone."""
    ids = torch.tensor([prompt_ids])
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
              eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        if adapter is None:
            with bb.peft.disable_adapter():
                out = bb.base.generate(ids, **kw)
        else:
            bb.peft.set_adapter(adapter)
            out = bb.peft.generate(input_ids=ids, **kw)
    return out[0, ids.shape[1]:].tolist()


def run_all(sched: Scheduler, jobs: list[tuple[list[int], str | None]], n: int) -> list[list[int]]:
    """Submit every job from its own thread at once; return each one's tokens."""
    results: list = [None] * len(jobs)

    def one(i):
        events: queue.Queue = queue.Queue()
        req = sched.submit(jobs[i][0], jobs[i][1], SamplingParams(max_tokens=n), events.put)
        while not events.get().finish_reason:
            pass
        results[i] = list(req.tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.fixture(scope="module")
def bb():
    return spread_backbone()


def test_batched_greedy_equals_transformers_generate_alone(bb):
    """fp32: mixed adapters, mixed lengths, one batch == each request alone through HF."""
    sched = Scheduler(bb, generators=["a", "b"], precision="fp32", max_batch=8)
    sched.eos = set()  # run the full length so every position is compared
    tok = bb.tokenizer
    adapters = [None, "a", "b", "a", None, "b"]
    jobs = [(tok(p)["input_ids"], a) for p, a in zip(PROMPTS, adapters)]
    batched = run_all(sched, jobs, 24)
    assert sched.steps < 24 * len(jobs) / 2, "requests were not decoded together"
    for (ids, adapter), got in zip(jobs, batched):
        assert got == hf_greedy(bb, ids, adapter, 24), f"adapter {adapter}"
    sched.close()


def test_requests_join_and_leave_between_steps(bb):
    """A request arriving while others decode joins the running batch (continuous batching)."""
    sched = Scheduler(bb, generators=["a", "b"], precision="fp32", max_batch=4)
    sched.eos = set()
    tok = bb.tokenizer
    first = queue.Queue()
    def paced(out):  # each of the long request's tokens takes >= 5 ms, so the short request's
        first.put(out)  # submit (which may first release this thread's OpenMP team) cannot lose
        time.sleep(0.005)  # the race against 60 steps of the tiny model

    long_req = sched.submit(tok(PROMPTS[0])["input_ids"], "a", SamplingParams(max_tokens=60), paced)
    first.get()  # it has produced a token: it is decoding
    short = run_all(sched, [(tok(PROMPTS[1])["input_ids"], "b")], 8)[0]
    assert not long_req.finished, "the short request had to wait for the long one"
    while not first.get().finish_reason:
        pass
    assert short == hf_greedy(bb, tok(PROMPTS[1])["input_ids"], "b", 8)
    assert long_req.tokens == hf_greedy(bb, tok(PROMPTS[0])["input_ids"], "a", 60)
    sched.close()


def test_cancel_frees_the_row_at_once(bb):
    sched = Scheduler(bb, generators=["a"], precision="fp32", max_batch=2)
    sched.eos = set()
    events = queue.Queue()
    req = sched.submit(bb.tokenizer("hi")["input_ids"], "a", SamplingParams(max_tokens=400),
                       events.put)
    events.get()
    req.cancel()
    while True:
        ev = events.get(timeout=10)
        if ev.finish_reason:
            break
    assert ev.finish_reason == "cancelled" and len(req.tokens) < 400
    assert sched.in_flight() == 0
    sched.close()


def test_refusals_name_the_limit(bb):
    sched = Scheduler(bb, generators=["a"], precision="fp32", max_batch=1, max_queue=2, max_len=64)
    ids = bb.tokenizer("hello")["input_ids"]
    with pytest.raises(UnknownModel):
        sched.submit(ids, "nope", SamplingParams(), lambda e: None)
    with pytest.raises(ServeError, match="context limit of 64"):
        sched.submit(ids, "a", SamplingParams(max_tokens=100), lambda e: None)
    with pytest.raises(ValueError, match="temperature"):
        sched.submit(ids, "a", SamplingParams(temperature=-1), lambda e: None)
    gate = threading.Event()
    sched.call(lambda: None)  # thread up
    sched._jobs.append((gate.wait, __import__("concurrent.futures").futures.Future()))
    reqs = [sched.submit(ids, "a", SamplingParams(max_tokens=3), lambda e: None) for _ in range(2)]
    with pytest.raises(QueueFull, match="limit 2"):
        sched.submit(ids, "a", SamplingParams(max_tokens=3), lambda e: None)
    gate.set()
    for r in reqs:
        r.cancel()
    sched.close()


def test_seeded_sampling_is_repeatable_in_any_batch(bb):
    sched = Scheduler(bb, generators=["a"], precision="fp32", max_batch=8)
    ids = bb.tokenizer("tell me")["input_ids"]
    params = dict(max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    alone = sched.generate(ids, "a", SamplingParams(**params))
    outs = []
    threads = [threading.Thread(target=lambda p=p: outs.append(
        sched.generate(ids, "a", SamplingParams(**{**params, "seed": p})))) for p in (7, 8, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outs.count(alone) >= 2
    sched.close()


def test_adapter_costs_only_its_lora_matrices(bb):
    sched = Scheduler(bb, generators=["a", "b"], precision="fp32")
    base_bytes = sum(p.numel() * p.element_size() for p in bb.base.parameters())
    lora_a = bb.adapter_nbytes("a")
    assert sched.runner.adapters["a"] == lora_a
    # fp32 engine shares the backbone's embedding (and head) tensors: no copy of them
    emb = sched.runner.lean.embed
    assert emb.data_ptr() == bb.base.get_input_embeddings().weight.data_ptr()
    assert lora_a < 0.1 * base_bytes
    # the stacked copy of both adapters costs their LoRA matrices (+ zero blocks of fused B)
    assert lora_a <= sched.runner.banks.nbytes() <= 4 * (lora_a + bb.adapter_nbytes("b"))
    sched.close()


def test_w8_and_bf16_engines_stay_close(bb):
    tok = bb.tokenizer
    ids = tok(PROMPTS[3])["input_ids"]
    ref = Scheduler(bb, generators=["a"], precision="fp32")
    ref.eos = set()
    exact = ref.generate(ids, "a", SamplingParams(max_tokens=6))
    for precision in ("bf16", "w8"):
        s = Scheduler(bb, generators=["a"], precision=precision)
        s.eos = set()
        text = s.generate(ids, "a", SamplingParams(max_tokens=6))
        assert len(text) > 0
        s.close()
    assert exact
    ref.close()


def test_classify_jobs_batch_across_adapters(tmp_path, bb):
    tasks = {}
    for name, labels in (("c1", ["x", "y"]), ("c2", ["p", "q", "r"])):
        spec = AdapterSpec.from_dict({"name": name, "kind": "classify", "labels": labels,
                                      "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
                                     tmp_path / name / "adapter.yaml")
        bb.add_adapter(name, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights=False))
        tasks[name] = ClassifyTask(spec, bb)
    sched = Scheduler(bb, classifiers=tasks, generators=[], precision="fp32")
    texts = ["good film", "bad day", "news today"]
    got = sched.classify(texts, ["c1", "c2", "c1"])
    alone = [tasks[a].predict([t])[0] for t, a in zip(texts, ["c1", "c2", "c1"])]
    for g, a in zip(got, alone):
        assert list(g) == list(a)
        assert max(abs(g[k] - a[k]) for k in g) < 1e-5
    with pytest.raises(UnknownModel):
        sched.classify(["x"], ["a"])
    sched.close()
    for name in tasks:
        bb.drop_adapter(name)


def test_sixteen_chat_sessions_share_batches_and_match_sequential(tmp_path, bb):
    """Demo tabs / `bot chat`: forked sessions decode together, each answer as if alone."""
    from helpers import HashEncoder

    from bot import ChatSession, Router
    from bot.tasks.generate import GenerateTask

    spec = AdapterSpec.from_dict({"name": "a", "kind": "generate", "template": ""},
                                 tmp_path / "a" / "adapter.yaml")
    router = Router(HashEncoder(), per_adapter_k=3)
    router.add_route("a", ["hello how are you", "tell me a joke"])
    sched = Scheduler(bb, generators=["a"], precision="fp32", max_batch=16)
    sched.eos = set()
    root = ChatSession(bb, {"a": GenerateTask(spec, bb)}, router, max_new_tokens=10,
                       scheduler=sched)
    texts = [f"message {i} {'x' * i}" for i in range(16)]
    sequential = [root.fork().send(t).reply for t in texts]
    steps_before = sched.steps
    got = run_concurrently(lambda i: root.fork().send(texts[i]).reply, 16, 60)
    assert got == sequential
    assert sched.steps - steps_before < 16 * 10 / 2, "sessions did not share batches"
    sched.close()
