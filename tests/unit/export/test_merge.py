"""Issue 27 item 4: adapter mixtures per request (``a:0.7+b:0.3``) and ``bot merge``.

Tiny random model, fp32: adapter "a" (rank 4 on q/v) and "b" (rank 2 on q/v/o), both with
random (non-zero) LoRA weights so that each changes the greedy tokens.
"""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import assert_openai_error, make_state, make_tiny_backbone, metric, post, wait_until
from peft import LoraConfig

from bot.engine import SamplingParams, Scheduler
from bot.engine.lora import Mixture
from bot.errors import BotError
from bot.export.merge import merge_adapters, parse_sources
from bot.manifests.spec import AdapterSpec
from bot.serve.server import BackgroundServer

PROMPTS = [[5, 9, 17, 33], [100, 4, 4, 8, 200, 31, 7], [42]]
CONFIGS = {"a": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                           target_modules=["q_proj", "v_proj"]),
           "b": LoraConfig(r=2, lora_alpha=8, init_lora_weights=False,
                           target_modules=["q_proj", "v_proj", "o_proj"])}


def strong(bb, name, config, factor=8.0):
    """Add adapter ``name`` with its random B scaled up, so it changes the greedy tokens."""
    bb.add_adapter(name, config)
    with torch.no_grad():
        for key, p in bb.peft.named_parameters():
            if "lora_B" in key and f".{name}." in key:
                p.mul_(factor)


def backbone_ab():
    bb = make_tiny_backbone()
    for name, config in CONFIGS.items():
        strong(bb, name, config)
    return bb


def engine(bb, names=("a", "b")) -> Scheduler:
    sched = Scheduler(bb, generators=list(names), precision="fp32", max_batch=8)
    sched.eos = set()
    return sched


def greedy(sched, prompt, adapter, n=16):
    return sched.generate_ids(prompt, adapter, SamplingParams(max_tokens=n))


def both_at_once(sched, prompt, first, second):
    """Two requests decoded in the same steps (the engine waits until both are queued)."""
    gate = threading.Event()
    holder = threading.Thread(target=sched.call, args=(gate.wait,))
    holder.start()
    out = [None, None]
    threads = [threading.Thread(target=lambda i=i, a=a: out.__setitem__(i, greedy(sched, prompt, a)))
               for i, a in enumerate((first, second))]
    for t in threads:
        t.start()
    assert wait_until(lambda: sched.in_flight() == 2)
    gate.set()
    for t in [holder, *threads]:
        t.join(60)
    return out


def test_a_mixture_weighing_one_adapter_1_and_another_0_is_that_adapter():
    sched = engine(backbone_ab())
    try:
        for prompt in PROMPTS:
            single = greedy(sched, prompt, "a")
            assert greedy(sched, prompt, Mixture((("a", 1.0), ("b", 0.0)))) == single
            assert greedy(sched, prompt, Mixture((("b", 0.0), ("a", 1.0)))) == single
            # and in the same batch as the plain adapter's request
            assert both_at_once(sched, prompt, "a", Mixture((("a", 1.0), ("b", 0.0)))) == \
                [single, single]
        assert greedy(sched, PROMPTS[0], "a") != greedy(sched, PROMPTS[0], None), \
            "adapter 'a' changes nothing: the test could not tell"
    finally:
        sched.close()


def test_the_weights_matter_and_zero_weights_are_the_base_model():
    sched = engine(backbone_ab())
    try:
        p = PROMPTS[1]
        half = greedy(sched, p, Mixture((("a", 0.5), ("b", 0.5))))
        assert half not in (greedy(sched, p, "a"), greedy(sched, p, "b"))
        assert greedy(sched, p, Mixture((("a", 0.0), ("b", 0.0)))) == greedy(sched, p, None)
    finally:
        sched.close()


def test_a_cat_merge_serves_the_same_tokens_as_the_mixture(tmp_path):
    bb = backbone_ab()
    for name in CONFIGS:
        save(bb, name, tmp_path)
    folder = merge_adapters(bb, tmp_path, "ab", [("a", 0.7), ("b", 0.3)], method="cat")
    assert (folder / "adapter_model.safetensors").exists()
    spec = AdapterSpec.from_dir(folder)
    assert spec.kind == "generate" and "a x0.7, b x0.3" in spec.description
    assert "ab" not in bb.adapters, "the merge stayed loaded on the backbone"
    bb.load_adapter("ab", folder)
    sched = engine(bb, ("a", "b", "ab"))
    try:
        for prompt in PROMPTS:
            assert greedy(sched, prompt, "ab") == greedy(sched, prompt, Mixture((("a", 0.7),
                                                                                  ("b", 0.3))))
    finally:
        sched.close()


def save(bb, name, adapters_dir):
    folder = adapters_dir / name
    bb.save_adapter(name, folder)
    AdapterSpec.from_dict({"name": name, "kind": "generate", "template": ""},
                          folder / "adapter.yaml").save(folder)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_each_method_writes_a_folder_that_loads_and_serves(tmp_path, method):
    bb = make_tiny_backbone()
    for name in ("a", "c"):  # same ranks: linear needs them
        strong(bb, name, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                    target_modules=["q_proj", "v_proj"]))
        save(bb, name, tmp_path)
    state = make_state(tmp_path / "serve")
    with BackgroundServer(state) as srv:
        folder = merge_adapters(bb, tmp_path, "m", [("a", 0.5), ("c", 0.5)], method=method)
        state.load_adapter("m", folder)
        r = post(srv, "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temp folder was left"


def test_merge_refuses_clearly_and_writes_nothing(tmp_path):
    bb = backbone_ab()
    for name in CONFIGS:
        save(bb, name, tmp_path)
    AdapterSpec.from_dict({"name": "mood", "kind": "classify", "labels": ["x", "y"]},
                          tmp_path / "mood" / "adapter.yaml").save(tmp_path / "mood")
    with pytest.raises(BotError, match="use --method cat"):  # ranks 4 and 2
        merge_adapters(bb, tmp_path, "n", [("a", 0.5), ("b", 0.5)], method="linear")
    with pytest.raises(BotError, match="only generation adapters"):
        merge_adapters(bb, tmp_path, "n", [("a", 0.5), ("mood", 0.5)])
    with pytest.raises(BotError, match="exists already"):
        merge_adapters(bb, tmp_path, "b", [("a", 0.5), ("b", 0.5)], method="cat")
    with pytest.raises(BotError, match="does not exist"):
        merge_adapters(bb, tmp_path, "n", [("a", 0.5), ("zzz", 0.5)], method="cat")
    with pytest.raises(BotError, match="--method"):
        merge_adapters(bb, tmp_path, "n", [("a", 0.5), ("b", 0.5)], method="svd")
    assert not (tmp_path / "n").exists()
    assert parse_sources("a:0.5,b:0.25") == [("a", 0.5), ("b", 0.25)]
    for bad in ("a:0.5,b", "a:x,b:1", "a:9,b:1", "a:nan,b:1", "a:1,a:1"):
        with pytest.raises(BotError, match="--from"):
            parse_sources(bad)


@pytest.fixture(scope="module")
def mix_server(tmp_path_factory):
    state = make_state(tmp_path_factory.mktemp("mix"))
    strong(state.backbone, "b", CONFIGS["b"])
    state.scheduler.add_adapter("b")
    with BackgroundServer(state) as srv:
        yield srv


def text(r) -> str:
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def test_the_api_serves_mixtures_on_both_endpoints(mix_server):
    for path, body in (("/v1/completions", {"prompt": "mix me"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "mix"}]})):
        plain = post(mix_server, path, {"model": "a", "max_tokens": 8, **body})
        mixed = post(mix_server, path, {"model": "a:1+b:0", "max_tokens": 8, **body})
        assert text(mixed) == text(plain)
        assert mixed.headers["x-bot-adapter"] == "a:1+b:0"
        assert mixed.json()["bot"]["adapter"] == "a:1+b:0"
        other = post(mix_server, path, {"model": "a:0.2+b:0.8", "max_tokens": 8, **body})
        assert text(other) != text(plain)
    assert wait_until(lambda: metric(mix_server, 'bot_generated_tokens_total{model="(mixture)"}') > 0)


@pytest.mark.parametrize("model,status,words", [
    ("a:0.5+nope:0.5", 404, ["'nope'", "not served"]),
    ("a:half+b:0.5", 400, ["not a number", "NAME:WEIGHT"]),
    ("a:0.5+b", 400, ["is not NAME:WEIGHT"]),
    ("a:3+b:0.5", 400, ["[-2, 2]"]),
    ("a:inf+b:0.5", 400, ["[-2, 2]"]),
    ("a:0.5+a:0.5", 400, ["named twice"]),
    ("a:0.5+mood:0.5", 400, ["'mood' cannot be mixed"]),
    ("a:0.5+tiny-llama:0.5", 400, ["cannot be mixed"]),
])
def test_bad_mixtures_are_refused_naming_model(mix_server, model, status, words):
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = post(mix_server, path, {"model": model, "max_tokens": 2, **body})
        assert_openai_error(r, status, *words, param="model")


def test_the_cli_refuses_a_bad_merge_before_loading_the_backbone(tmp_path, capsys, monkeypatch):
    import bot.cli as cli

    def no_backbone(args):
        raise AssertionError("the backbone was loaded for a merge that cannot run")

    monkeypatch.setattr(cli, "_backbone", no_backbone)
    AdapterSpec.from_dict({"name": "a", "kind": "generate"}, tmp_path / "a" / "adapter.yaml"
                          ).save(tmp_path / "a")
    for argv, words in ((["n", "--from", "a:0.5,zz:0.5"], "does not exist"),
                        (["n", "--from", "a:0.5,b"], "--from"),
                        (["a", "--from", "a:0.5,b:0.5"], "exists already"),
                        (["n", "--from", "a:1"], "at least two")):
        assert cli.main(["merge", *argv, "--adapters-dir", str(tmp_path)]) == 2
        assert words in capsys.readouterr().err


def test_the_transformers_fallback_refuses_a_mixture_and_serves_its_adapters():
    from helpers import make_tiny_family, make_tokenizer

    from bot.errors import ServeError
    from bot.model.backbone import Backbone

    bb = Backbone.from_model(make_tiny_family("gpt2"), make_tokenizer(), name="tiny-gpt2")
    for name in ("a", "b"):
        bb.add_adapter(name, LoraConfig(r=2, init_lora_weights=False, target_modules=["c_attn"],
                                        fan_in_fan_out=True))
    sched = engine(bb)
    try:
        assert sched.runner.name == "transformers"
        assert len(greedy(sched, PROMPTS[0], "a", n=3)) == 3
        with pytest.raises(ServeError, match="mixtures need the lean engine"):
            greedy(sched, PROMPTS[0], Mixture((("a", 0.5), ("b", 0.5))))
    finally:
        sched.close()
