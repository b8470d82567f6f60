"""`bot export` for vLLM: exported folders reproduce bot's outputs with plain transformers + peft."""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from helpers import PET_TEMPLATE, PET_WORDS, EngineGenerator, make_adapter, make_tiny_backbone
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bot.errors import ExportError
from bot.export.vllm import VLLM_LORA_MODULES, export


def _config(bb) -> dict:
    # dtype is set by any engine build (bot.engine), not by the export
    return {k: v for k, v in bb.base.config.to_dict().items() if k not in ("dtype", "torch_dtype")}


def texts(n=50, seed=1):
    rng = random.Random(seed)
    return [" ".join(rng.choice(PET_WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny backbone with two classifiers (3 and 2 labels) and one generation adapter."""
    root = tmp_path_factory.mktemp("export")
    bb = make_tiny_backbone()
    tasks = {
        "pets": make_adapter(bb, root / "adapters", "pets", "classify", layers=[1]),
        "mood": make_adapter(bb, root / "adapters", "mood", "classify", labels=("neg", "pos"),
                             seed=3),
        "talk": make_adapter(bb, root / "adapters", "talk", "generate", r=16, seed=2,
                             targets=VLLM_LORA_MODULES),
    }
    bb.base.config.pad_token_id = None  # like SmolLM2: the export takes it from the tokenizer
    before = _config(bb)
    manifest = export(["pets", "mood", "talk"], root / "out", backbone=bb,
                      adapters_dir=root / "adapters")
    assert _config(bb) == before, "the export changed the live backbone's config"
    return {"bb": bb, "tasks": tasks, "out": root / "out", "manifest": manifest,
            "adapters": root / "adapters"}


def plain_probs(model_dir, adapter_dir, formatted, num_labels=None):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    kwargs = {"num_labels": num_labels} if num_labels else {}
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32,
                                                               **kwargs)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(formatted, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return torch.softmax(model(**enc).logits.float(), dim=-1)


def test_classifier_probabilities_match_bot(exported):
    task, out = exported["tasks"]["pets"], exported["out"]
    sample = texts()
    ours = torch.tensor([[p[label] for label in task.labels] for p in task.predict(sample)])
    without_lora = torch.tensor([[p[label] for label in task.labels]
                                 for p in task.predict(sample, adapter=None)])
    assert (ours - without_lora).abs().max() > 1e-3, "the LoRA weights must matter in this test"
    formatted = [task.format(t) for t in sample]
    plain = plain_probs(out / "base-classify-3", out / "pets", formatted)
    assert plain.shape == ours.shape == (50, 3)
    assert (plain - ours).abs().max() <= 1e-4
    # the plain base folder with num_labels given gives the same (the adapter brings the head)
    plain_base = plain_probs(out / "base", out / "pets", formatted, num_labels=3)
    assert (plain_base - ours).abs().max() <= 1e-4


def test_two_label_classifier_matches_bot(exported):
    task, out = exported["tasks"]["mood"], exported["out"]
    sample = texts(20, seed=5)
    ours = torch.tensor([[p[label] for label in task.labels] for p in task.predict(sample)])
    plain = plain_probs(out / "base-classify-2", out / "mood", [task.format(t) for t in sample])
    assert (plain - ours).abs().max() <= 1e-4


def test_generation_greedy_tokens_match_bot(exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bb, task, out = exported["bb"], exported["tasks"]["talk"], exported["out"]
    fast = EngineGenerator(bb, "fp32")
    model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(model, out / "talk").eval()
    changed = False
    for prompt in ["hello there", "what is a cat?", "tell me a story"]:
        ids = task.prompt_ids(prompt)
        kwargs = {"max_new_tokens": 12, "repetition_penalty": 1.1}
        ours = fast.generate(ids, adapter="talk", **kwargs)[0].tolist()
        base = fast.generate(ids, adapter=None, **kwargs)[0].tolist()
        with torch.inference_mode():
            theirs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    do_sample=False, pad_token_id=bb.tokenizer.pad_token_id,
                                    **kwargs)[0, ids.shape[1]:].tolist()
        assert theirs == ours, prompt
        changed |= base != ours
    assert changed, "the adapter must change at least one greedy reply"


def test_files_match_what_vllm_loads(exported):
    out, bb, manifest = exported["out"], exported["bb"], exported["manifest"]
    hidden = bb.base.config.hidden_size
    assert manifest["max_lora_rank"] == 16  # smallest allowed value >= the largest rank (16)
    for name, kind, rank, labels in [("pets", "classify", 8, 3), ("mood", "classify", 8, 2),
                                     ("talk", "generate", 16, None)]:
        cfg = json.loads((out / name / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == rank and cfg["lora_alpha"] == 16
        assert not cfg["use_dora"] and cfg["bias"] == "none" and not cfg["rank_pattern"]
        assert set(cfg["target_modules"]) <= set(VLLM_LORA_MODULES)
        with safe_open(str(out / name / "adapter_model.safetensors"), "pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        lora = {k: v for k, v in tensors.items() if ".lora_" in k}
        assert lora and all(k.startswith("base_model.model.model.layers.") for k in lora)
        for k, v in lora.items():
            assert (v.shape[0] if ".lora_A." in k else v.shape[1]) == rank, k
        if kind == "classify":
            assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
            assert set(tensors) - set(lora) == {"base_model.model.score.weight"}
            assert tuple(tensors["base_model.model.score.weight"].shape) == (labels, hidden)
            meta = json.loads((out / name / "labels.json").read_text())
            assert meta["num_labels"] == labels and meta["template"] == PET_TEMPLATE
            assert meta["label2id"] == {v: int(k) for k, v in meta["id2label"].items()}
            base_cfg = json.loads((out / f"base-classify-{labels}" / "config.json").read_text())
            assert base_cfg["architectures"] == ["LlamaForSequenceClassification"]
            # transformers stores num_labels as the id2label map (vLLM reads it the same way)
            assert len(base_cfg["id2label"]) == labels and base_cfg["pad_token_id"] == 256
        else:
            assert not cfg["modules_to_save"] and set(tensors) == set(lora)
    # layers_to_transform is not read by vLLM: the tensors alone must say which layers
    pets = load_file(str(out / "pets" / "adapter_model.safetensors"))
    assert {k.split(".")[4] for k in pets if ".lora_" in k} == {"1"}
    base_cfg = json.loads((out / "base" / "config.json").read_text())
    assert base_cfg["pad_token_id"] == 256 and base_cfg["torch_dtype"] == "float32"
    # transformers 4.x spelling kept beside transformers 5's (older vLLM releases read it)
    assert base_cfg["rope_theta"] == base_cfg["rope_parameters"]["rope_theta"]
    tok_cfg = json.loads((out / "base" / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in out.rglob("*"))  # readable by others
    # the classify bases share the base weights (hard links), they do not copy them
    assert (out / "base-classify-3" / "backbone-model.safetensors").stat().st_ino == \
        (out / "base" / "model.safetensors").stat().st_ino


def test_head_key_is_what_peft_writes(tmp_path):
    """peft's own modules_to_save file for a Llama classifier uses the same head key."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification

    bb = make_tiny_backbone()
    cfg = bb.base.config
    cfg.num_labels = 3
    model = get_peft_model(LlamaForSequenceClassification(cfg),
                           LoraConfig(r=8, target_modules=["q_proj"], task_type="SEQ_CLS",
                                      modules_to_save=["score"]))
    model.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys


def test_readme_has_the_commands_and_templates(exported):
    text = (exported["out"] / "README.md").read_text()
    assert ("vllm serve ./base --served-model-name base --dtype bfloat16 --max-model-len 2048 "
            "--enable-lora --max-lora-rank 16 --max-loras 1 --lora-modules talk=./talk --port 8000"
            ) in text
    assert "vllm serve ./base-classify-2 --served-model-name base-classify-2 --runner pooling " \
           "--convert classify" in text
    assert "--lora-modules mood=./mood --port 8001" in text
    assert "--lora-modules pets=./pets --port 8002" in text
    assert PET_TEMPLATE in text
    manifest = json.loads((exported["out"] / "export.json").read_text())
    assert manifest["classify"]["pets"]["base"] == "base-classify-3"


class _Recorder(BaseHTTPRequestHandler):
    """Answers like vLLM / bot serve and records each request (path, JSON body)."""

    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, body))
        if self.path.endswith("/chat/completions"):
            reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "hi!"}}]}
        else:
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            reply = {"id": "x", "object": "list", "created": 0, "model": body["model"],
                     "data": [{"index": i, "label": "x", "probs": [0.25, 0.75], "num_classes": 2}
                              for i in range(len(inputs))]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_readme_client_code_sends_what_both_servers_expect(exported):
    pytest.importorskip("openai")
    long_text = " ".join(texts(60, seed=5))
    text = (exported["out"] / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        ns: dict = {"__name__": "snippet"}
        exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 (our own generated code)
        assert ns["BASE_URLS"]["mood"] == "http://127.0.0.1:8000/v1"  # bot serve by default
        # bot serve: one /v1 base URL; vLLM: /classify at a pooling instance's root
        ns["BASE_URLS"].update(talk=f"{url}/v1", mood=f"{url}/v1", pets=url)
        ns["TOKENIZER_DIR"] = str(exported["out"] / "base")  # the snippet runs from the export
        assert ns["chat"]("talk", "hello") == "hi!"
        assert ns["classify"]("mood", "so happy") == {"neg": 0.25, "pos": 0.75}
        ns["classify"]("pets", "woof")
        ns["classify"]("pets", long_text)
    finally:
        server.shutdown()
    (p1, chat), (p2, mood), (p3, pets), (_, long_pets) = _Recorder.seen[-4:]
    assert p1 == "/v1/chat/completions" and chat["model"] == "talk"
    assert chat["temperature"] == 0 and chat["repetition_penalty"] == 1.1
    assert p2 == "/v1/classify" and mood == {"model": "mood", "input": PET_TEMPLATE.format(text="so happy")}
    assert p3 == "/classify" and pets["input"] == PET_TEMPLATE.format(text="woof")
    # A text longer than the adapter's max_length: the windows bot reads, each ending kept.
    bb, pets = exported["bb"], exported["manifest"]["classify"]["pets"]
    max_length = pets["max_length"]
    assert long_pets["input"] == bb.windows(PET_TEMPLATE, long_text, max_length, pets["max_windows"])
    assert len(long_pets["input"]) > 1 and all(w.endswith("\nAnimal:") for w in long_pets["input"])
    assert all(len(bb.encode([w], 10 * max_length)["input_ids"][0]) <= max_length for w in long_pets["input"])
    assert all(len(w) < len(PET_TEMPLATE.format(text=long_text)) for w in long_pets["input"])


# ------------------------------------------------------------------ refusals
@pytest.fixture
def tiny(tmp_path):
    return make_tiny_backbone(), tmp_path / "adapters", tmp_path / "out"


def _pets_with_bias(tmp_path, bb, adapters, bias):
    rng = random.Random(0)
    rows = ["text,label"] + [f"{' '.join(rng.choice(PET_WORDS) for _ in range(5))} {i},"
                             f"{('cat', 'dog', 'bird')[i % 3]}" for i in range(120)]
    (tmp_path / "pets.csv").write_text("\n".join(rows) + "\n")
    make_adapter(bb, adapters, "pets", "classify", data=tmp_path / "pets.csv")
    head = adapters / "pets" / "head.safetensors"
    state = load_file(str(head))
    state["bias"] = torch.tensor(bias)
    save_file(state, str(head))


def test_refuses_a_head_whose_bias_changes_held_out_predictions(tmp_path, tiny):
    bb, adapters, out = tiny
    _pets_with_bias(tmp_path, bb, adapters, [50.0, 0.0, -50.0])
    with pytest.raises(ExportError, match=r"has a bias.*changes \d+ of \d+ held-out predictions.*"
                                          r"Fix: `bot train pets`") as err:
        export(["pets"], out, backbone=bb, adapters_dir=adapters)
    assert "head.safetensors" in str(err.value)
    assert not out.exists(), "a refused export writes nothing"


def test_drops_a_bias_that_changes_no_held_out_prediction(tmp_path, tiny):
    bb, adapters, out = tiny
    _pets_with_bias(tmp_path, bb, adapters, [1e-7, 0.0, -1e-7])
    bb.drop_adapter("pets")  # as in `bot export`: the backbone arrives without the adapter
    manifest = export(["pets"], out, backbone=bb, adapters_dir=adapters)
    check = manifest["classify"]["pets"]["bias_dropped"]
    assert check["changed"] == 0 and check["n"] > 0 and check["max_prob_diff"] < 1e-5
    assert "pets" not in bb.adapters, "the check leaves the backbone as it found it"


def test_refuses_ranks_vllm_cannot_serve(tiny):
    bb, adapters, out = tiny
    make_adapter(bb, adapters, "talk", "generate", r=16)
    with pytest.raises(ExportError, match=r"talk \(r=16\).*Fix: --max-lora-rank 16"):
        export(["talk"], out, backbone=bb, adapters_dir=adapters, max_lora_rank=8)
    with pytest.raises(ExportError, match=r"--max-lora-rank 12 is not a value vLLM accepts"):
        export(["talk"], out, backbone=bb, adapters_dir=adapters, max_lora_rank=12)
    assert export(["talk"], out, backbone=bb, adapters_dir=adapters,
                  max_lora_rank=32)["max_lora_rank"] == 32


def test_refuses_a_rank_above_512(tiny):
    bb, adapters, out = tiny
    # the manifest itself refuses r > 512 (issue 9); a hand-edited peft config is caught here
    make_adapter(bb, adapters, "huge", "generate", r=8, targets=("q_proj",))
    cfg_path = adapters / "huge" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "r": 1024}))
    with pytest.raises(ExportError, match=r"huge/adapter_model.safetensors: tensor .* not rank 1024"):
        export(["huge"], out, backbone=bb, adapters_dir=adapters)


def test_refuses_dora_and_unsupported_modules_listing_every_problem(tiny):
    bb, adapters, out = tiny
    make_adapter(bb, adapters, "talk", "generate")
    make_adapter(bb, adapters, "pets", "classify", seed=4)
    cfg_path = adapters / "talk" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_dora"] = True
    cfg_path.write_text(json.dumps(cfg))
    cfg_path = adapters / "pets" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = cfg["target_modules"] + ["lm_head"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ExportError) as err:
        export(["talk", "pets"], out, backbone=bb, adapters_dir=adapters)
    msg = str(err.value)
    assert "talk/adapter_config.json: use_dora is true; vLLM does not load DoRA" in msg
    assert "target_modules ['lm_head'] are not LoRA-capable" in msg
    assert msg.count("Fix:") >= 2


def test_refuses_an_adapter_of_another_backbone_and_a_foreign_folder(tiny, tmp_path):
    bb, adapters, out = tiny
    make_adapter(bb, adapters, "talk", "generate")
    other = make_tiny_backbone(seed=1, name="other")
    with pytest.raises(ExportError, match=r"trained on backbone tiny-llama@.*Fix"):
        export(["talk"], out, backbone=other, adapters_dir=adapters)
    with pytest.raises(ExportError, match=r"no adapter 'nope'.*found: \['talk'\]"):
        export(["nope"], out, backbone=bb, adapters_dir=adapters)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="is not a bot export"):
        export(["talk"], foreign, backbone=bb, adapters_dir=adapters)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cli_export(tmp_path, capsys):
    """`bot export` end to end, the backbone loaded from a folder as a user would."""
    from bot.cli import main
    from bot.model.backbone import Backbone

    tiny = make_tiny_backbone()
    folder = tmp_path / "tiny"
    tiny.base.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    bb = Backbone.load(str(folder))
    make_adapter(bb, tmp_path / "adapters", "pets", "classify")
    out = tmp_path / "out"
    common = ["--backbone", str(folder), "--adapters-dir", str(tmp_path / "adapters")]
    assert main(["export", "pets", "--to", str(out), *common]) == 0
    assert "pets (classify)" in capsys.readouterr().out
    assert (out / "pets" / "labels.json").exists() and (out / "README.md").exists()
    assert main(["export", "pets", "--to", str(out), "--max-lora-rank", "7", *common]) == 2
    assert "Fix: use one of" in capsys.readouterr().err
    assert (out / "pets" / "labels.json").exists(), "a refused export keeps the previous one"
    assert main(["export", "pets", "--to", str(out), "--max-lora-rank", "64", *common]) == 0
    assert json.loads((out / "export.json").read_text())["max_lora_rank"] == 64
    make_adapter(bb, tmp_path / "adapters", "base-classify-2", "generate")
    assert main(["export", "base-classify-2", "--to", str(tmp_path / "o2"), *common]) == 2
    assert "collides with the exported backbone folder" in capsys.readouterr().err
