"""The multi-adapter backbone on a tiny random Llama: isolation, mixed batches, threads, files."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import make_tiny_backbone, make_tiny_model
from peft import LoraConfig

from bot.errors import AdapterError, BackboneError, FingerprintMismatch
from bot.model.backbone import Backbone

TEXTS = ["hello there", "the cat sat on the mat", "stocks fell", "a much longer sentence here ok"]


def lora(seed: int) -> LoraConfig:
    torch.manual_seed(seed)
    # init_lora_weights=False: B is random too, so the adapter really changes outputs
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False)


def add(bb: Backbone, name: str, seed: int) -> None:
    torch.manual_seed(seed)
    bb.add_adapter(name, lora(seed))


def logits(bb: Backbone, texts, adapters) -> torch.Tensor:
    with torch.inference_mode():
        batch = bb.encode(texts)
        return bb.forward(batch, adapters).logits


def test_adapters_are_isolated(tiny_backbone):
    add(tiny_backbone, "one", 1)
    add(tiny_backbone, "two", 2)
    la, lb = logits(tiny_backbone, TEXTS, "one"), logits(tiny_backbone, TEXTS, "two")
    assert not torch.allclose(la, lb, atol=1e-3)


def test_base_equals_model_without_peft():
    bb = make_tiny_backbone(seed=3)
    plain = make_tiny_model(seed=3)
    add(bb, "one", 1)
    with torch.inference_mode():
        expected = plain(**bb.encode(TEXTS)).logits
    assert torch.allclose(logits(bb, TEXTS, None), expected, atol=1e-6)
    assert not torch.allclose(logits(bb, TEXTS, "one"), expected, atol=1e-3)


def test_mixed_batch_rows_equal_single_runs(tiny_backbone):
    add(tiny_backbone, "one", 1)
    add(tiny_backbone, "two", 2)
    names = ["one", "two", None, "one"]
    mixed = tiny_backbone.pooled(TEXTS, names)
    for i, (text, name) in enumerate(zip(TEXTS, names)):
        alone = tiny_backbone.pooled([text], name)
        assert torch.allclose(mixed[i], alone[0], atol=1e-4), f"row {i} ({name}) differs"


def test_adding_an_adapter_leaves_others_unchanged(tiny_backbone):
    add(tiny_backbone, "one", 1)
    before = logits(tiny_backbone, TEXTS, "one")
    add(tiny_backbone, "two", 2)
    tiny_backbone.drop_adapter("two")
    add(tiny_backbone, "three", 3)
    assert torch.equal(logits(tiny_backbone, TEXTS, "one"), before)


def test_threads_match_sequential(tiny_backbone):
    add(tiny_backbone, "one", 1)
    add(tiny_backbone, "two", 2)
    plan = [("one" if i % 3 == 0 else "two" if i % 3 == 1 else None, TEXTS[i % 4]) for i in range(48)]
    expected = [tiny_backbone.pooled([t], n)[0] for n, t in plan]
    results: list = [None] * len(plan)

    def worker(k: int) -> None:
        for i in range(k, len(plan), 8):
            name, text = plan[i]
            results[i] = tiny_backbone.pooled([text], name)[0]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (got, want) in enumerate(zip(results, expected)):
        assert torch.equal(got, want), f"call {i} ran on the wrong adapter"


def test_save_load_round_trip(tiny_backbone, tmp_path):
    add(tiny_backbone, "one", 1)
    before = logits(tiny_backbone, TEXTS, "one")
    tiny_backbone.save_adapter("one", tmp_path / "one")
    assert (tmp_path / "one" / "adapter_model.safetensors").exists()
    other = make_tiny_backbone()
    other.load_adapter("one", tmp_path / "one", expected_fingerprint=tiny_backbone.fingerprint)
    assert torch.allclose(logits(other, TEXTS, "one"), before, atol=1e-6)


def test_fingerprint_mismatch_names_both(tiny_backbone, tmp_path):
    add(tiny_backbone, "one", 1)
    tiny_backbone.save_adapter("one", tmp_path / "one")
    other = make_tiny_backbone(seed=9, name="other-llama")
    assert other.fingerprint != tiny_backbone.fingerprint
    with pytest.raises(FingerprintMismatch) as err:
        other.load_adapter("one", tmp_path / "one", expected_fingerprint=tiny_backbone.fingerprint)
    assert tiny_backbone.fingerprint in str(err.value) and other.fingerprint in str(err.value)


@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated", "pickle-only"])
def test_bad_weight_file_is_named_and_others_keep_working(tiny_backbone, tmp_path, damage):
    add(tiny_backbone, "good", 1)
    add(tiny_backbone, "bad", 2)
    tiny_backbone.save_adapter("bad", tmp_path / "bad")
    weights = tmp_path / "bad" / "adapter_model.safetensors"
    if damage == "missing":
        weights.unlink()
    elif damage == "corrupt":
        weights.write_bytes(b"\x00garbage" * 10)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        weights.rename(weights.with_name("adapter_model.bin"))
    tiny_backbone.drop_adapter("bad")
    before = logits(tiny_backbone, TEXTS, "good")
    with pytest.raises(AdapterError) as err:
        tiny_backbone.load_adapter("bad", tmp_path / "bad")
    assert "adapter_model.safetensors" in str(err.value)
    assert tiny_backbone.adapters == ["good"]
    assert torch.equal(logits(tiny_backbone, TEXTS, "good"), before)


def test_weights_from_another_architecture_are_refused(tmp_path):
    big = Backbone.from_model(make_tiny_model(hidden=64), make_tiny_backbone().tokenizer, "big")
    add(big, "one", 1)
    big.save_adapter("one", tmp_path / "one")
    small = make_tiny_backbone()
    add(small, "keep", 2)
    with pytest.raises(AdapterError, match="does not fit this backbone"):
        small.load_adapter("one", tmp_path / "one")
    assert small.adapters == ["keep"]


def test_unknown_adapter_name_is_clear(tiny_backbone):
    add(tiny_backbone, "one", 1)
    with pytest.raises(AdapterError, match="not loaded"):
        tiny_backbone.pooled(["x"], "nope")


def _runner(bb, precision="fp32"):
    from bot.engine import Scheduler

    return Scheduler(bb, generators=list(bb.adapters), precision=precision).runner


def test_engine_matches_unmerged_peft(tiny_backbone):
    add(tiny_backbone, "one", 1)
    runner = _runner(tiny_backbone)
    ids = tiny_backbone.encode(["hello"])["input_ids"]
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        want = tiny_backbone.forward({"input_ids": ids}, "one").logits
    got = runner.sequence_logits(enc, ["one"])
    base = runner.sequence_logits(enc, [None])
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(base, logits(tiny_backbone, ["hello"], None), atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter is applied


def test_engine_w8_is_close_to_fp32(tiny_backbone):
    add(tiny_backbone, "one", 1)
    runner = _runner(tiny_backbone, "fp32,w8")
    ids = tiny_backbone.encode(["hello"])["input_ids"]
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    q = runner.sequence_logits(enc, ["one"], kind="w8")
    f = runner.sequence_logits(enc, ["one"], kind="fp32")
    assert torch.allclose(torch.softmax(q, -1), torch.softmax(f, -1), atol=0.02)
    assert not torch.equal(q, f)  # it did run another kernel


def test_shared_engine_forgets_retrained_adapter(tiny_backbone):
    from bot.engine import SamplingParams

    add(tiny_backbone, "one", 1)
    engine = tiny_backbone.engine()
    engine.eos = set()
    ids = tiny_backbone.encode(["hello"])["input_ids"][0].tolist()
    first = engine.generate_ids(ids, "one", SamplingParams(max_tokens=8))
    assert "one" in engine.generators
    tiny_backbone.drop_adapter("one")
    assert "one" not in engine.generators
    add(tiny_backbone, "one", 5)
    assert engine.generate_ids(ids, "one", SamplingParams(max_tokens=8)) != first


def test_missing_backbone_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="could not load backbone"):
        Backbone.load("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="config.json"):
        Backbone.load(str(tmp_path / "empty"))


def test_padded_batches_leave_the_shared_tokenizer_alone(tiny_backbone):
    """A fast tokenizer's padding/truncation settings are shared state: the serving thread's
    padded classification batches must not switch them under a chat thread's prompt (and the
    reverse), which once gave "Unable to create tensor" in the demo's parallel sessions."""
    backend = tiny_backbone.tokenizer.backend_tokenizer
    before = (backend.padding, backend.truncation, tiny_backbone.tokenizer.padding_side)
    batch = tiny_backbone.encode(["hi", "a much longer text than that"], max_length=12)
    assert batch["input_ids"].shape == (2, 12)
    assert (backend.padding, backend.truncation, tiny_backbone.tokenizer.padding_side) == before


def test_padded_batches_while_other_threads_tokenize(tiny_backbone):
    tok = tiny_backbone.tokenizer
    texts = ["short", "a somewhat longer text", "x" * 40]
    stop = threading.Event()
    errors: list[str] = []

    def prompts() -> None:  # what chat threads do: unpadded prompts, no truncation
        while not stop.is_set():
            tok.apply_chat_template([{"role": "user", "content": "hello there"}],
                                    add_generation_prompt=True, return_dict=True)
            tok("some text")["input_ids"]

    others = [threading.Thread(target=prompts) for _ in range(2)]
    for t in others:
        t.start()
    try:
        for _ in range(300):
            try:
                batch = tiny_backbone.encode(texts, max_length=24)
            except ValueError as err:
                errors.append(str(err))
                continue
            if batch["input_ids"].shape != (3, 24):
                errors.append(f"ragged batch {tuple(batch['input_ids'].shape)}")
    finally:
        stop.set()
        for t in others:
            t.join()
    assert not errors, errors[:3]


TEMPLATE = "Classify the topic of this news text.\n\n{text}\n\nTopic:"


def test_long_text_is_cut_before_the_template_ending(tiny_backbone):
    tok = tiny_backbone.tokenizer
    article = "Shares in the company rose sharply today. " * 40
    prompt = tiny_backbone.fit_template(TEMPLATE, article, 64)
    assert prompt.startswith("Classify the topic") and prompt.endswith("\n\nTopic:")
    assert len(tok(prompt)["input_ids"]) <= 64
    # the encoder's own truncation would have dropped the ending
    plain = tok(TEMPLATE.format(text=article), truncation=True, max_length=64)["input_ids"]
    assert not tok.decode(plain).endswith("Topic:")
    # and the last token a classify head reads is the ending's, not the article's
    batch = tiny_backbone.encode([prompt], 64)
    last = int(batch["attention_mask"][0].sum()) - 1
    assert tok.decode(batch["input_ids"][0, last - 1:last + 1]).endswith(":")


def test_short_text_and_unicode_are_left_whole(tiny_backbone):
    short = "Striker scores twice"
    # the tiny tokenizer has one token per byte: the template alone is 51 tokens
    assert tiny_backbone.fit_template(TEMPLATE, short, 128) == TEMPLATE.format(text=short)
    # byte-level tokens: a 4-byte character is several tokens, so the cut counts tokens, not characters
    emoji = "\U0001F600" * 30
    prompt = tiny_backbone.fit_template(TEMPLATE, emoji, 128)
    assert prompt.endswith("Topic:") and len(tiny_backbone.tokenizer(prompt)["input_ids"]) <= 128
    assert "\U0001F600" in prompt


def test_classify_task_prompts_keep_their_ending(tiny_backbone):
    from bot.manifests.spec import AdapterSpec
    from bot.tasks.classify import ClassifyTask

    spec = AdapterSpec.from_dict({"name": "topic", "kind": "classify", "labels": ["a", "b"],
                                  "template": TEMPLATE, "train": {"max_length": 96, "max_windows": 1}})
    task = ClassifyTask(spec, tiny_backbone)
    items, _ = task._items([{"text": "word " * 200, "label": "a", "views": {"headline": "short one"}}])
    assert [t.endswith("Topic:") for t, _ in items] == [True, True]
    assert len(tiny_backbone.tokenizer(items[0][0])["input_ids"]) <= 96
    spec.train.view_repeats = 3
    items, _ = task._items([{"text": "an article", "label": "b", "views": {"headline": "short one"}}])
    assert [label for _, label in items] == [1, 1, 1, 1]
    assert [t.count("short one") for t, _ in items] == [0, 1, 1, 1]
    # per view: headline twice, lede once, any view not named once
    spec.train.view_repeats = {"headline": 2, "lede": 1}
    row = {"text": "an article", "label": "a", "views": {"headline": "short one", "lede": "first line",
                                                         "other": "third"}}
    items, _ = task._items([row])
    assert [sum(v in t for t, _ in items) for v in ("short one", "first line", "third")] == [2, 1, 1]
    spec.train.view_repeats = {"lede": 0}  # evaluated only
    items, _ = task._items([row])
    assert [sum(v in t for t, _ in items) for v in ("short one", "first line", "third")] == [1, 0, 1]


def test_one_short_row_skips_bf16_autocast_at_inference_only():
    bb = make_tiny_backbone()
    bb.compute_dtype = torch.bfloat16  # as on a CPU with native bf16

    def autocast_on(batch) -> bool:
        with bb.autocast(batch):
            return torch.is_autocast_enabled("cpu")

    one, two = bb.encode(["a short turn"], 64), bb.encode(["a short turn", "another"], 64)
    long = bb.encode(["word " * 200], 512)
    with torch.inference_mode():
        assert not autocast_on(one)  # one short row: fp32 is faster than converting weights
        assert autocast_on(two) and autocast_on(long) and autocast_on(None)
    assert autocast_on(one)  # with gradients (training) the precision never changes
    bb.compute_dtype = torch.float32
    with torch.inference_mode():
        assert not autocast_on(two)
