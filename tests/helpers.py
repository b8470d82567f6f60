"""Shared test helpers: tiny models and tokenizers built in memory, toy data, stand-in
encoders, a tiny server state and the small HTTP helpers the serving tests share.

Test modules import from here (``from helpers import ...``; tests/conftest.py's folder is on
sys.path); no test module imports another test module (tests/unit/test_code_health.py).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import socket
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import torch
from peft import LoraConfig

from bot.engine import SamplingParams, Scheduler
from bot.manifests import versions
from bot.manifests.spec import AdapterSpec
from bot.model.backbone import Backbone
from bot.model.families import DEFAULT_TARGET_MODULES
from bot.routing import Router
from bot.serve.limits import Limits
from bot.serve.state import ServerState
from bot.tasks import task_class
from bot.tasks.classify import ClassifyTask
from bot.tasks.generate import GenerateTask
from bot.training.train import save_adapter_folder
from bot.util.fsutil import atomic_dir_write

REPO = Path(__file__).resolve().parent.parent
"""The repository root (tests/ sits right below it)."""

# ------------------------------------------------------------------ tiny models
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    """Byte-level BPE with no merges: every byte is a token (vocab 256 + 3 specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", bos_token="<|im_start|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_model(seed: int = 0, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=260, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         pad_token_id=256, eos_token_id=258, bos_token_id=257)
    return LlamaForCausalLM(config).eval()


def make_tiny_backbone(seed: int = 0, name: str = "tiny-llama"):

    return Backbone.from_model(make_tiny_model(seed), make_tokenizer(), name=name)


def tiny_backbone_with_generators():
    """The tiny backbone with two random LoRA adapters 'a' (r=4) and 'b' (r=8) on every projection."""
    backbone = make_tiny_backbone()
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i + 1)
        backbone.add_adapter(name, LoraConfig(r=4 + 4 * i, lora_alpha=8, init_lora_weights=False,
                                              target_modules=list(DEFAULT_TARGET_MODULES)))
    return backbone


FAMILIES = ("qwen2", "gpt2", "gpt_neox", "gemma")
"""Causal LM families besides Llama that the tests build (bot.model.families handles their names)."""


def make_tiny_family(family: str, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A tiny random model of ``family`` over the byte tokenizer's 260 ids.

    GPT-2 uses Conv1D layers named c_attn/c_proj/c_fc and learned absolute positions;
    GPT-NeoX a fused query_key_value; Qwen2 has biased q/k/v; Gemma scales embeddings.
    """
    import transformers as tf

    torch.manual_seed(seed)
    ids = dict(vocab_size=260, pad_token_id=256, eos_token_id=258, bos_token_id=257)
    llama_like = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, max_position_embeddings=512, **ids)
    if family == "qwen2":
        config = tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **llama_like)
    elif family == "gemma":
        config = tf.GemmaConfig(num_key_value_heads=2, head_dim=hidden // 4, **llama_like)
    elif family == "gpt_neox":
        config = tf.GPTNeoXConfig(**llama_like)
    elif family == "gpt2":
        config = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **ids)
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    return tf.AutoModelForCausalLM.from_config(config).eval()


def run_concurrently(fn, n: int, timeout: float = 300.0) -> list:
    """Call ``fn(i)`` for i in 0..n-1, each from its own thread at once; results in order.

    A call that did not finish in time leaves None in its place.
    """
    import threading

    results: list = [None] * n

    def one(i):
        results[i] = fn(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results


class EngineGenerator:
    """``generate(ids, adapter=..., max_new_tokens=..., repetition_penalty=...)`` -> (1, N) new
    ids through the engine (bot.engine.Scheduler), EOS included as transformers returns it."""

    def __init__(self, backbone, precision: str = "fp32"):
        self.sched = Scheduler(backbone, precision=precision, auto_adapters=True)

    def generate(self, ids, adapter=None, max_new_tokens=16, repetition_penalty=1.0, eos_token_id="default"):
        if eos_token_id is None:
            self.sched.eos = set()
        params = SamplingParams(max_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
        out = self.sched.generate_ids(ids[0].tolist(), adapter, params, with_eos=True)
        return torch.tensor([out], dtype=torch.long)


def spread_backbone(seed: int = 0) -> Backbone:
    """A tiny Llama whose logits are well apart (init std 0.5), so greedy ties are rare."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=256, eos_token_id=258,
                      bos_token_id=257, initializer_range=0.5)
    bb = Backbone.from_model(LlamaForCausalLM(cfg).eval(), make_tokenizer(), name="tiny-spread")
    for name in ("a", "b"):
        bb.add_adapter(name, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    return bb


NO_LLAMA = "llama-cpp-python is not installed: pip install -e '.[llamacpp]' (compiles ~15 min) or set BOT_LLAMACPP_PATH"


def with_random_lora(bb, name="chat", seed=0):
    """``bb`` with a random (non-zero) LoRA adapter ``name`` on every default target module."""
    torch.manual_seed(seed)
    bb.add_adapter(name, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                    target_modules=list(DEFAULT_TARGET_MODULES)))
    return bb


# ------------------------------------------------------------------ stand-in encoders
class HashEncoder:
    """Deterministic stand-in for SentenceTransformer: words hashed into ``dim`` buckets."""

    def __init__(self, dim: int = 1024):
        self.dim = dim
        self.calls: list[list[str]] = []

    def encode(self, texts, normalize_embeddings=False, convert_to_numpy=True, **_):
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9']+", text.lower()):
                out[row, zlib.crc32(word.encode()) % self.dim] += 1.0
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


class WordHashEncoder:
    """Stand-in sentence encoder: each word bumps one of ``dim`` buckets."""

    def __init__(self, dim: int = 512):
        self.dim = dim

    def encode(self, texts, normalize_embeddings=False, **_):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z']+", text.lower()):
                out[row, zlib.crc32(word.encode()) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


ROUTES = {
    "sentiment": ["i loved this blender it is great", "terrible product awful waste of money"],
    "chat": ["hi how are you today", "tell me a joke please"],
}


SENTIMENT = ["i loved this movie it was great", "terrible product awful quality",
             "the food was delicious", "worst service ever", "great phone love it"]
TOPIC = ["shares fall as bank profits drop", "government minister announces election",
         "team wins the league final", "tech firm launches new chip",
         "film star wins award at festival"]
CHAT = ["hello how are you", "tell me a joke please", "can you help me with my homework",
        "good morning friend", "what time is it"]


def make_router(k: int = 5, chat_route: bool = False, **kwargs) -> Router:
    router = Router(HashEncoder(), per_adapter_k=k, **kwargs)
    router.add_route("sentiment", SENTIMENT)
    router.add_route("topic", TOPIC)
    if chat_route:
        router.add_route("chat", CHAT)
    return router


# Held-out turns: none of them is a route example.
HELDOUT = {
    "sentiment": ["loved the movie", "awful product", "great food", "terrible service"],
    "topic": ["bank shares fall", "minister wins election", "team wins final", "tech chip firm"],
    "chat": ["zebra xylophone", "quantum banana soup", "nice weather we have", "bye now"],
}


class Oracle:
    """Stands in for the route adapter's ClassifyTask: fixed probabilities per text."""

    def __init__(self, labels, answers: dict[str, str], sure: float = 0.97):
        self.labels, self.answers, self.sure, self.seen = list(labels), answers, sure, []

    def predict(self, texts, batch_size=32):
        self.seen += texts
        rest = (1 - self.sure) / (len(self.labels) - 1)
        return [{n: (self.sure if n == self.answers.get(t) else rest) for n in self.labels} for t in texts]


ENCODER_TEXTS = ["hello there", "  leading and trailing spaces  ", "", "x",
                 "How do I bake banana bread? " * 40,  # longer than max_seq_length: truncated alike
                 "Émile a dit: ça va? 😀", "Stocks fell sharply after the bank raised rates"]


def st_encode(model, texts):
    """The reference vectors: SentenceTransformer.encode, normalised."""
    return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)


# ------------------------------------------------------------------ toy data and adapters
WORDS = {"cat": ["meow", "purr", "whiskers", "kitten"], "dog": ["woof", "bark", "fetch", "puppy"]}


def toy_csv(path, n=120, seed=0):
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(n):
        label = rng.choice(sorted(WORDS))
        lines.append(f"the {rng.choice(WORDS[label])} number {i},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def toy_spec(tmp_path, epochs=4.0) -> AdapterSpec:
    folder = tmp_path / "adapters" / "pets"
    spec = AdapterSpec.from_dict({
        "name": "pets", "kind": "classify", "labels": ["cat", "dog"],
        "data": {"path": str(toy_csv(tmp_path / "pets.csv"))},
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj", "up_proj"]},
        "train": {"epochs": epochs, "batch_size": 8, "learning_rate": 0.003, "head_lr": 0.03,
                  "max_length": 32},
    }, folder / "adapter.yaml")
    spec.save(folder)
    return AdapterSpec.from_dir(folder)


def task_on_fresh_backbone(layers=(2, 3), dtype=torch.float32, dropout=0.05):
    bb = Backbone.from_model(make_tiny_model(seed=0, layers=4), make_tokenizer(), name="tiny4")
    bb.compute_dtype = dtype
    spec = AdapterSpec.from_dict({
        "name": "pets", "kind": "classify", "labels": ["cat", "dog"],
        "lora": {"r": 4, "dropout": dropout, "layers": list(layers) if layers else None},
        "train": {"batch_size": 8, "learning_rate": 0.003, "head_lr": 0.03, "max_length": 40,
                  "max_windows": 1},  # texts cut to fit: item counts below assume one per text
    })
    torch.manual_seed(0)
    bb.add_adapter("pets", spec.lora.to_peft(4))
    return ClassifyTask(spec, bb)


ROUTE_VOCAB = {
    "pets": {"cat": ["meow", "purr", "whiskers", "kitten"], "dog": ["woof", "bark", "fetch", "puppy"]},
    "food": {"sweet": ["cake", "candy", "honey", "sugar"], "savory": ["salt", "cheese", "bacon", "pickle"]},
    "weather": {"sun": ["sunny", "bright", "clear", "warm"], "rain": ["rainy", "storm", "drizzle", "wet"]},
    # the words of pets again: a route that takes pets' turns away
    "animals": {"tame": ["meow", "purr", "woof", "bark"], "wild": ["whiskers", "kitten", "fetch", "puppy"]},
}


def route_csv(path, route: str, n: int = 120, seed: int = 0):
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(n):
        label = rng.choice(sorted(ROUTE_VOCAB[route]))
        words = rng.sample(ROUTE_VOCAB[route][label], 2)
        lines.append(f"{words[0]} {words[1]} item {i},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def route_spec(root, route: str) -> AdapterSpec:
    folder = root / route
    spec = AdapterSpec.from_dict({
        "name": route, "kind": "classify", "labels": sorted(ROUTE_VOCAB[route]),
        "data": {"path": str(route_csv(root.parent / f"{route}.csv", route))},
        "description": f"{route} words", "route_examples": [" ".join(sum(ROUTE_VOCAB[route].values(), []))],
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "train": {"epochs": 3.0, "batch_size": 8, "learning_rate": 0.003, "head_lr": 0.03, "max_length": 32},
    }, folder / "adapter.yaml")
    spec.save(folder)
    return AdapterSpec.from_dir(folder)


PET_TEMPLATE = "Pet words: {text}\nAnimal:"
PET_WORDS = ["meow", "purr", "woof", "bark", "tweet", "whiskers", "fetch", "the", "a", "very"]


def make_adapter(bb, root, name, kind, *, r=8, layers=None, labels=("cat", "dog", "bird"),
                 targets=("q_proj", "v_proj", "up_proj", "down_proj"), seed=0, data=None):
    """A trained-looking adapter with random (non-zero) LoRA B weights and head, saved the way bot saves it."""
    folder = root / name
    raw = {"name": name, "kind": kind, "lora": {"r": r, "target_modules": list(targets),
                                                "layers": layers},
           "backbone": {"name": bb.info.name, "fingerprint": bb.fingerprint}}
    if kind == "classify":
        raw.update(labels=list(labels), template=PET_TEMPLATE)
    if data is not None:
        raw["data"] = {"path": str(data), "text_col": "text", "label_col": "label"}
    spec = AdapterSpec.from_dict(raw, folder / "adapter.yaml")
    bb.add_adapter(name, spec.lora.to_peft(bb.base.config.num_hidden_layers))
    gen = torch.Generator().manual_seed(seed)
    for pname, p in bb.peft.named_parameters():
        if f"lora_B.{name}." in pname:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    task = task_class(kind)(spec, bb)
    if kind == "classify":
        task.head.weight.data.copy_(torch.randn(task.head.weight.shape, generator=gen))
        if task.head.bias is not None:  # heads are bias-free (issue 12); zero an old-style one
            torch.nn.init.zeros_(task.head.bias)
    save_adapter_folder(spec, bb, task, {}, folder)
    return task


# ------------------------------------------------------------------ adapter folders and versions

def adapters_with(tmp_path, trained, *names) -> Path:
    """An adapters/ folder holding copies of the trained adapter under ``names`` (same manifest name)."""
    root = tmp_path / "adapters"
    for name in names:
        shutil.copytree(trained, root / name)
    return root


def write_exact(path: Path, text: str) -> Path:
    """Write ``text`` as given: no newline translation (the user-file tests write raw CR, U+2028 and form feeds)."""
    path.write_text(text, encoding="utf-8", newline="")
    return path


def tree(root: Path, skip=(".versions", ".trash", ".changes")) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root``, bookkeeping folders left out."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not any(part in skip or part.endswith(".lock") for part in rel.parts):
            out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def fake_adapter(folder: Path, tag: str, name: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = name or folder.name
    (folder / "adapter.yaml").write_text(f"name: {name}\nkind: classify\nlabels: [a, b]\n"
                                         f"description: version {tag}\n")
    (folder / "adapter_model.safetensors").write_bytes(tag.encode() * 100)
    (folder / "metrics.json").write_text(json.dumps({
        "adapter": name, "kind": "classify", "date": f"2026-01-0{len(tag)} 10:00:00",
        "heldout": {"text": {"accuracy": 0.5 + 0.1 * len(tag), "n": 10}}}))
    return folder


def save_new(folder: Path, tag: str) -> Path:
    """A save as bot.training.train does it: write a temp folder, swap it in, keep the previous one."""
    return atomic_dir_write(folder, lambda tmp: fake_adapter(tmp, tag, folder.name) and None,
                            versions.retirer(folder))


# ------------------------------------------------------------------ a tiny server
KEY = "reliability-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = Limits(max_body_bytes=64 * 1024, max_classify_inputs=8, header_timeout=1.0,
                body_timeout=1.0, keep_alive_timeout=1)
MAX_LEN = 256


def make_state(tmp_path, *, limits=LIMITS, max_queue=16, max_batch=4, api_key=KEY,
               default_max_tokens=None) -> ServerState:
    """Generation adapter "a", classify adapter "mood" (and the router for "auto")."""
    bb = make_tiny_backbone()
    bb.add_adapter("a", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                   target_modules=["q_proj", "v_proj"]))
    bb.add_adapter("mood", LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    spec_a = AdapterSpec.from_dict({"name": "a", "kind": "generate", "template": ""},
                                   tmp_path / "a" / "adapter.yaml")
    spec_m = AdapterSpec.from_dict({"name": "mood", "kind": "classify", "labels": ["sad", "happy"],
                                    "reply_template": "Sounds {label}."},
                                   tmp_path / "mood" / "adapter.yaml")
    tasks = {"a": GenerateTask(spec_a, bb), "mood": ClassifyTask(spec_m, bb)}
    router = Router(HashEncoder(), per_adapter_k=3)
    router.add_route("a", ["hello how are you", "tell me a joke", "good morning friend"])
    router.add_route("mood", ["i loved this movie", "terrible product awful", "great phone"])
    sched = Scheduler(bb, {"mood": tasks["mood"]}, ["a"], precision="fp32", max_batch=max_batch,
                      max_queue=max_queue, max_len=MAX_LEN)
    sched.eos = set()  # the random model would stop at random: run full lengths
    return ServerState(bb, tasks, sched, router, api_key, default_max_tokens=default_max_tokens,
                       limits=limits)


def post(srv, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(srv.url + path, content=data, timeout=30,
                      headers={**AUTH, "Content-Type": "application/json", **kw.pop("headers", {})},
                      **kw)


def assert_openai_error(r, status, *words, param="unset"):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == ("invalid_request_error" if 400 <= status < 500 and status not in
                           (401, 403, 404, 429) else err["type"])
    for w in words:
        assert w in err["message"], (w, err["message"])
    if param != "unset":
        assert err["param"] == param, err
    return err


def _url(srv) -> str:
    return srv if isinstance(srv, str) else srv.url


def connect(srv) -> socket.socket:
    """A raw TCP connection to the server (a BackgroundServer or its URL)."""
    host, port = _url(srv).removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_all(sock, limit_s=10.0) -> bytes:
    """Everything the server sends until it closes the connection (or ``limit_s`` passes)."""
    sock.settimeout(limit_s)
    out = b""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def request_head(srv, path, length=None, extra=b"") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: {_url(srv)[7:]}\r\nAuthorization: Bearer {KEY}\r\n" \
           "Content-Type: application/json\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return head.encode() + extra + b"\r\n"


def metric(srv, line_start: str) -> float:
    """The value of the first /metrics sample whose line starts with ``line_start`` (0 if none)."""
    for line in httpx.get(srv.url + "/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until(cond, limit_s=10.0, step=0.01) -> bool:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def slow_steps(monkeypatch, sched, seconds=0.01):
    """Make each engine step of ``sched`` take ``seconds`` longer (a client can leave mid-reply)."""
    real = sched.runner.step

    def step(*args, **kw):
        time.sleep(seconds)
        return real(*args, **kw)

    monkeypatch.setattr(sched.runner, "step", step)


def reply(r) -> tuple[str, str]:
    """(text, finish_reason) of the first choice of a 200 chat or completions answer."""
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return text, choice["finish_reason"]
