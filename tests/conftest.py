"""Shared fixtures: a tiny random Llama with a byte-level tokenizer, built in memory.

No download and no bundled weights: the logic tests run in seconds on a CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models gain nothing from threads, and spare cores keep a parallel training run fast
torch.set_num_threads(1)

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
    from bot.model.backbone import Backbone

    return Backbone.from_model(make_tiny_model(seed), make_tokenizer(), name=name)


@pytest.fixture
def tiny_backbone():
    return make_tiny_backbone()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


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
        from bot.engine import Scheduler

        self.sched = Scheduler(backbone, precision=precision, auto_adapters=True)

    def generate(self, ids, adapter=None, max_new_tokens=16, repetition_penalty=1.0, eos_token_id="default"):
        from bot.engine import SamplingParams

        if eos_token_id is None:
            self.sched.eos = set()
        params = SamplingParams(max_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
        out = self.sched.generate_ids(ids[0].tolist(), adapter, params, with_eos=True)
        return torch.tensor([out], dtype=torch.long)
