"""Any causal LM: add, train, eval, chat and serve on tiny Qwen2, GPT-2, GPT-NeoX and Gemma.

Each family is saved as a model folder and loaded through ``--backbone FOLDER`` as a
user would. The GPT-2 tokenizer has no pad token and no chat template, and the
GPT-NeoX tokenizer pads on the left by default, so those paths run too.
"""

from __future__ import annotations

import json
import random
import threading

import pytest
import torch
import yaml
from helpers import FAMILIES, WordHashEncoder, make_tiny_family, make_tokenizer

from bot.chat import ChatSession
from bot.cli import main
from bot.engine import SamplingParams
from bot.errors import AdapterError
from bot.model.backbone import Backbone, last_token_states
from bot.model.families import lora_targets

EXPECTED_TARGETS = {
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],
    "gpt_neox": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
}
WORDS = {"cat": ["meow", "purr", "whiskers", "kitten"], "dog": ["woof", "bark", "fetch", "puppy"]}
NAMES = ["ann", "bob", "cy", "dee", "eve", "flo", "gus", "hal"]


def family_tokenizer(family: str):
    tok = make_tokenizer()
    if family == "gpt2":  # like GPT-2's own: no pad token, no chat template
        tok.pad_token = None
        tok.chat_template = None
    if family == "gpt_neox":
        tok.padding_side = "left"
    return tok


def write_data(tmp_path):
    rng = random.Random(0)
    lines = ["text,label"]
    for i in range(120):
        label = rng.choice(sorted(WORDS))
        lines.append(f"number {i} is a {rng.choice(WORDS[label])},{label}")
    (tmp_path / "pets.csv").write_text("\n".join(lines) + "\n")
    rows = [{"prompt": f"greet {n} please", "reply": f"hello {n}!"} for n in NAMES * 6]
    (tmp_path / "talk.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def tune_manifest(path, **train):
    """What a user would edit after `bot add`: a higher rate for a tiny model, short inputs."""
    raw = yaml.safe_load(path.read_text())
    raw["train"].update(train)
    raw["route_examples"] = ["number 1 is a meow", "number 2 is a bark"] if raw["kind"] == "classify" \
        else ["greet someone please", "hello there"]
    path.write_text(yaml.safe_dump(raw))


# GPT-2 (no pad token, no chat template, Conv1D layers) is the family furthest from Llama:
# it runs in `make test-fast`; the others run in `make test` and CI (marked slow)
PARAMS = [f if f == "gpt2" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


@pytest.fixture(scope="module", params=PARAMS)
def trained(request, tmp_path_factory):
    """(family, backbone folder, adapters folder) after `bot add` + `bot train` of two adapters."""
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    folder = tmp / "backbone"
    make_tiny_family(family).save_pretrained(folder)
    family_tokenizer(family).save_pretrained(folder)
    write_data(tmp)
    adapters = tmp / "adapters"
    common = ["--adapters-dir", str(adapters)]
    assert main(["add", "pets", "--from", str(tmp / "pets.csv"), *common]) == 0
    assert main(["add", "talk", "--from", str(tmp / "talk.jsonl"), "--kind", "generate", *common]) == 0
    tune_manifest(adapters / "pets" / "adapter.yaml", epochs=6, batch_size=8, learning_rate=0.003,
                  head_lr=0.03, max_length=32)
    tune_manifest(adapters / "talk" / "adapter.yaml", epochs=6, batch_size=8, learning_rate=0.01,
                  max_length=48)
    model = ["--backbone", str(folder), "--device", "cpu", *common]
    for name in ("pets", "talk"):
        assert main(["train", name, *model]) == 0
    return family, folder, adapters


def test_adapters_train_on_the_family_own_layers(trained):
    family, folder, adapters = trained
    pets = json.loads((adapters / "pets" / "metrics.json").read_text())
    assert pets["heldout"]["text"]["accuracy"] >= 0.8, (family, pets["heldout"])
    talk = json.loads((adapters / "talk" / "metrics.json").read_text())
    assert talk["heldout"]["ppl_adapter"] < 0.8 * talk["heldout"]["ppl_base"], (family, talk["heldout"])
    # the manifest names Llama's layers; the saved adapter targets the family's own
    saved = json.loads((adapters / "pets" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(EXPECTED_TARGETS[family])
    assert pets["device"] == "cpu" and pets["weights"] == "fp32"


def test_eval_on_the_family(trained, tmp_path):
    family, folder, adapters = trained
    out = tmp_path / "reports"
    assert main(["eval", "pets", "talk", "--backbone", str(folder), "--adapters-dir", str(adapters),
                 "--no-router", "--max-examples", "20", "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    pets, talk = result["tasks"]["pets"], result["tasks"]["talk"]
    assert pets["adapter"]["accuracy"] >= 0.8, (family, pets)
    assert talk["ppl_adapter"] < talk["ppl_base"] and len(talk["samples"]) >= 3, (family, talk)
    assert result["meta"]["device"] == "cpu"


def test_chat_and_serve_on_the_family(trained, monkeypatch, tmp_path):
    family, folder, adapters = trained
    monkeypatch.setenv("BOT_CACHE", str(tmp_path / "cache"))  # the router cache
    bb = Backbone.load(str(folder), device="cpu")
    session = ChatSession.from_dir(bb, adapters, encoder=WordHashEncoder())
    assert not session.failures, session.failures
    turn = session.send("number 7 is a meow")
    assert turn.adapter == "pets" and turn.label_scores["cat"] > 0.5, (family, turn)
    turn = session.send("greet gus please")
    assert turn.adapter == "talk" and isinstance(turn.reply, str), (family, turn)

    # serving: concurrent requests of different lengths, each equal to its run alone
    sched = session.scheduler
    sched.eos = set()
    prompts = [session.tasks["talk"].prompt_ids(f"greet {n} please")[0].tolist() for n in NAMES[:3]]
    prompts.append(bb.tokenizer("a longer prompt, with more bytes in it")["input_ids"])
    params = SamplingParams(max_tokens=6)
    alone = [sched.generate(p, a, params) for p, a in zip(prompts, ["talk", "talk", None, "talk"])]
    together = [None] * len(prompts)

    def one(i, adapter):
        together[i] = sched.generate(prompts[i], adapter, params)

    threads = [threading.Thread(target=one, args=(i, a))
               for i, a in enumerate(["talk", "talk", None, "talk"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    probs = sched.classify(["number 3 is a woof", "number 4 is a purr"], ["pets", "pets"])
    direct = session.tasks["pets"].predict(["number 3 is a woof", "number 4 is a purr"])
    for got, want in zip(probs, direct):
        assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_fall_back_to_the_family_linear_layers(family):
    model = make_tiny_family(family)
    assert sorted(lora_targets(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                       "up_proj", "down_proj"])) == sorted(EXPECTED_TARGETS[family])
    present = EXPECTED_TARGETS[family][0]
    assert lora_targets(model, [present, "no_such_layer"]) == [present]
    with pytest.raises(AdapterError, match=f"none of.*its layers are.*{present}.*Fix:"):
        lora_targets(model, ["no_such_layer"])


def test_pooling_is_the_same_with_left_or_right_padding():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert torch.equal(last_token_states(hidden, right)[0], hidden[0, 2])
    assert torch.equal(last_token_states(hidden, left)[0], hidden[0, 4])
    assert torch.equal(last_token_states(hidden, left)[1], hidden[1, 4])


def test_tokenizer_without_pad_token_or_template_gets_both(tmp_path):
    folder = tmp_path / "gpt2"
    make_tiny_family("gpt2").save_pretrained(folder)
    family_tokenizer("gpt2").save_pretrained(folder)
    bb = Backbone.load(str(folder), device="cpu")
    assert bb.tokenizer.pad_token_id == bb.tokenizer.eos_token_id
    assert "<|im_start|>assistant" in bb.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    # a left-padding tokenizer still pools each text's own last token. Compared in float32: on a
    # CPU with native bf16, one short row skips the autocast a batch gets (backbone.short_row),
    # and bf16 rounding is not what this test is about.
    bb.compute_dtype = torch.float32
    bb.tokenizer.padding_side = "left"
    both = bb.pooled(["hi", "a much longer text"], None)
    alone = bb.pooled(["hi"], None)
    assert torch.allclose(both[0], alone[0], atol=1e-5)
