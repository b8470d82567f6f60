"""Device and precision choice: auto picks what exists, absent GPUs and bitsandbytes are refused
clearly, and an adapter's fingerprint does not depend on the device or dtype."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_tiny_backbone, make_tiny_model, make_tokenizer

from bot.cli import main
from bot.errors import BackboneError
from bot.manifests.spec import AdapterSpec
from bot.model.backbone import Backbone
from bot.model.device import compute_dtype, resolve_device, resolve_load_in
from bot.tasks.classify import ClassifyTask
from bot.training.train import save_adapter_folder

NO_CUDA = not torch.cuda.is_available()


def test_auto_device_is_cpu_here_and_explicit_cpu_works(monkeypatch):
    monkeypatch.delenv("BOT_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("BOT_DEVICE", "cpu")
    assert resolve_device(None) == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_is_refused_clearly_without_a_gpu():
    with pytest.raises(BackboneError, match="no CUDA GPU.*Fix: pass --device auto or cpu"):
        resolve_device("cuda")


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_loading_is_refused_without_cuda(bits):
    with pytest.raises(BackboneError, match=f"--load-in {bits} .*needs a CUDA GPU.*Fix:"):
        resolve_load_in(bits, torch.device("cpu"))


def test_quantized_loading_refusal_from_the_cli(tmp_path, capsys):
    folder = tmp_path / "bb"
    make_tiny_model().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    assert main(["info", "--backbone", str(folder), "--device", "cpu", "--load-in", "4bit",
                 "--adapters-dir", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_load_in_auto_keeps_fp32_on_the_cpu_and_bf16_is_honoured(tmp_path):
    folder = tmp_path / "bb"
    make_tiny_model().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    assert resolve_load_in("auto", torch.device("cpu")) == "fp32"
    fp32 = Backbone.load(str(folder), device="cpu")
    bf16 = Backbone.load(str(folder), device="cpu", load_in="bf16")
    assert fp32.base.dtype == torch.float32 and bf16.base.dtype == torch.bfloat16
    assert fp32.load_in == "fp32" and bf16.load_in == "bf16"
    assert fp32.fingerprint == bf16.fingerprint


def test_fingerprint_is_equal_for_fp32_and_bf16_copies():
    model = make_tiny_model()
    half = copy.deepcopy(model).to(torch.bfloat16)
    a = Backbone.from_model(model, make_tokenizer(), name="tiny")
    b = Backbone.from_model(half, make_tokenizer(), name="tiny")
    assert a.fingerprint == b.fingerprint
    other = Backbone.from_model(make_tiny_model(seed=1), make_tokenizer(), name="tiny")
    assert other.fingerprint != a.fingerprint


def test_adapter_trained_in_fp32_loads_on_a_bf16_backbone(tmp_path):
    """What a CPU-trained adapter meets on a GPU (bf16 weights): it loads and agrees."""
    from bot.manifests.registry import load_task

    bb = make_tiny_backbone()
    spec = AdapterSpec(name="pets", kind="classify", labels=["cat", "dog"], folder=tmp_path / "pets")
    torch.manual_seed(0)
    bb.add_adapter("pets", spec.lora.to_peft(model=bb.base))
    for n, p in bb.peft.named_parameters():  # a non-trivial adapter without training
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    task = ClassifyTask(spec, bb)
    spec = spec.replace(backbone={"name": "tiny", "fingerprint": bb.fingerprint})
    save_adapter_folder(spec, bb, task, {}, spec.folder)
    want = task.predict(["meow meow", "woof"])

    half = Backbone.from_model(make_tiny_model().to(torch.bfloat16), make_tokenizer(), name="tiny-llama")
    got = load_task(half, AdapterSpec.from_dir(spec.folder)).predict(["meow meow", "woof"])
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=0.02)


def test_legacy_fingerprint_is_still_accepted(tmp_path):
    """Adapters saved before the fingerprint ignored dtype carry the float32-only hash."""
    from bot.model.backbone import _fingerprints

    bb = make_tiny_backbone()
    new, legacy = _fingerprints("tiny-llama", bb.base)
    assert new == bb.fingerprint and legacy and legacy != new
    bb.add_adapter("one", AdapterSpec(name="one", kind="generate").lora.to_peft(model=bb.base))
    bb.save_adapter("one", tmp_path / "one")
    other = make_tiny_backbone()
    other.load_adapter("one", tmp_path / "one", expected_fingerprint=legacy)
    assert "one" in other.adapters


def test_compute_dtype_on_gpus_is_half_precision(monkeypatch):
    monkeypatch.delenv("BOT_COMPUTE", raising=False)
    assert compute_dtype(torch.device("mps")) == torch.float16
    monkeypatch.setenv("BOT_COMPUTE", "fp32")
    assert compute_dtype(torch.device("cuda")) == torch.float32


def test_quantized_backbone_decodes_unmerged_and_serving_refuses_it(monkeypatch):
    """8/4-bit layers need CUDA; the load_in flag alone selects the paths a quantized backbone takes."""
    from helpers import spread_backbone

    from bot.engine import Scheduler

    bb = spread_backbone()
    ids = bb.tokenizer("hello there", return_tensors="pt")["input_ids"]
    from helpers import EngineGenerator

    from bot.tasks.generate import peft_generate

    gen = EngineGenerator(bb, "fp32")
    want = [gen.generate(ids, adapter=a, max_new_tokens=6, eos_token_id=None).tolist()
            for a in ("a", "b", None)]
    assert len({str(w) for w in want}) == 3  # the adapters change the tokens
    bb.load_in = "4bit"
    got = [peft_generate(bb, ids, a, max_new_tokens=6, min_new_tokens=6).tolist() for a in ("a", "b", None)]
    assert got == want
    with pytest.raises(BackboneError, match="cannot run a 4bit.*Fix: load the backbone with --load-in bf16"):
        Scheduler(bb, generators=["a"])
