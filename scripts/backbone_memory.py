"""Print the README's "Use a bigger backbone" memory table, computed from parameter counts.

Each model is built from its published architecture numbers (hidden size, layers,
heads, vocabulary; the ``config.json`` of each model on the Hugging Face Hub, copied
here because this script must run offline) on the meta device, so no weights are
downloaded or allocated; the embedded SmolLM2-135M row is checked against the real
converted backbone when it is in the cache. Memory of the weights:

* fp32 4 bytes and bf16 2 bytes per parameter;
* 8bit (bitsandbytes LLM.int8) 1 byte per parameter of the decoder's linear layers,
  4bit (NF4 with double quantization, about 4.127 bits) 0.516 bytes; embeddings, norms
  and the output head stay bf16, as transformers leaves them;
* LoRA r=8 on every linear layer of the blocks: its float32 weights + gradients + two
  AdamW moments = 16 bytes per LoRA parameter (training only);
* KV cache: 2 (keys, values) x layers x kv_heads x head_dim x 2 bytes (bf16) per token.

Activations during training (batch_size x max_length) and the CUDA context come on
top and are not counted. Usage: ``python scripts/backbone_memory.py``.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# name: (model_type, hidden, intermediate, layers, heads, kv_heads, vocab, tied, extra)
MODELS = {
    "SmolLM2-135M-Instruct (embedded)": ("llama", 576, 1536, 30, 9, 3, 49152, True, {}),
    "SmolLM2-360M-Instruct": ("llama", 960, 2560, 32, 15, 5, 49152, True, {}),
    "Qwen2.5-0.5B-Instruct": ("qwen2", 896, 4864, 24, 14, 2, 151936, True, {}),
    "Llama-3.2-1B-Instruct": ("llama", 2048, 8192, 16, 32, 8, 128256, True, {}),
    "Qwen2.5-1.5B-Instruct": ("qwen2", 1536, 8960, 28, 12, 2, 151936, True, {}),
    "SmolLM2-1.7B-Instruct": ("llama", 2048, 8192, 24, 32, 32, 49152, True, {}),
    "gemma-2-2b-it": ("gemma2", 2304, 9216, 26, 8, 4, 256000, True, {"head_dim": 256}),
    "Llama-3.2-3B-Instruct": ("llama", 3072, 8192, 28, 24, 8, 128256, True, {}),
    "Qwen2.5-7B-Instruct": ("qwen2", 3584, 18944, 28, 28, 4, 152064, False, {}),
    "Llama-3.1-8B-Instruct": ("llama", 4096, 14336, 32, 32, 8, 128256, False, {}),
}
BYTES_4BIT = 4.127 / 8
GB = 1e9


def skeleton(model_type, hidden, inter, layers, heads, kv, vocab, tied, extra):
    config = AutoConfig.for_model(model_type, hidden_size=hidden, intermediate_size=inter,
                                  num_hidden_layers=layers, num_attention_heads=heads,
                                  num_key_value_heads=kv, vocab_size=vocab,
                                  tie_word_embeddings=tied, **extra)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def figures(model) -> dict:
    head = model.get_output_embeddings()
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    linear, lora = 0, 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            linear += module.weight.numel()
            lora += 8 * (module.in_features + module.out_features)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
    rest = total - linear
    return {"params": total, "fp32": 4 * total, "bf16": 2 * total,
            "8bit": linear + 2 * rest, "4bit": BYTES_4BIT * linear + 2 * rest,
            "lora_train": 16 * lora, "kv_1k": 1000 * kv_per_token}


def check_embedded(counted: int) -> str:
    """The real embedded backbone's parameter count, when its converted folder is cached."""
    try:
        from bot.model.backbone import EMBEDDED_NAME
        from bot.util.assets import cache_dir

        folder = cache_dir() / "backbones" / f"{EMBEDDED_NAME}-f32"
        if not (folder / "config.json").exists():
            return "embedded backbone not converted yet: not checked"
        with torch.device("meta"):
            real = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        n = sum(p.numel() for p in real.parameters())
        return f"embedded backbone check: {n:,} parameters in the real model, {counted:,} here"
    except Exception as err:  # a report line, never a failure
        return f"embedded backbone not checked ({err})"


def main() -> None:
    print("| backbone | parameters | fp32 | bf16 | 8bit | 4bit | + LoRA r=8 training state | "
          "KV cache per 1k tokens (bf16) |")
    print("|---|---|---|---|---|---|---|---|")
    first = None
    for name, spec in MODELS.items():
        f = figures(skeleton(*spec))
        first = first or f["params"]
        cells = [f"{f[k] / GB:.2f} GB" for k in ("fp32", "bf16", "8bit", "4bit")]
        print(f"| {name} | {f['params'] / 1e9:.2f} B | " + " | ".join(cells) +
              f" | {f['lora_train'] / GB:.2f} GB | {f['kv_1k'] / 1e6:.0f} MB |")
    print()
    print(check_embedded(first))


if __name__ == "__main__":
    main()
