"""What differs between causal LM families: LoRA target layers, padding, chat format.

Manifests name LoRA targets with Llama's module names (``q_proj`` ... ``down_proj``);
GPT-2 calls its layers ``c_attn``/``c_proj``/``c_fc`` (Conv1D, not nn.Linear), GPT-NeoX
``query_key_value``/``dense``/``dense_h_to_4h``/``dense_4h_to_h``. So the targets are
resolved against the loaded model: names it lacks are dropped, and when none is left
every linear layer of the decoder blocks is adapted (peft's "all-linear" rule: every
nn.Linear/Conv1D except the output head), which for a Llama-style model is exactly
the default list.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bot.errors import AdapterError, BackboneError

if TYPE_CHECKING:  # annotations only: reading a manifest (bot.manifests.spec) needs no torch
    import torch

log = logging.getLogger(__name__)

# Every linear layer of a Llama-style decoder block: what manifests name by default (bot add
# writes it). Other families (GPT-2, GPT-NeoX...) name their layers differently:
# lora_targets resolves the list per backbone.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# ChatML, used only when a tokenizer brings no chat template of its own (base GPT-2 and
# friends); the replies end with the tokenizer's end-of-sequence token.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of every linear layer (nn.Linear or GPT-2's Conv1D) but the output head.

    bitsandbytes' 8/4-bit layers subclass nn.Linear; a layer peft already wrapped shows up
    as ``<name>.base_layer`` and counts under ``<name>``.
    """
    # lazy: torch and transformers are heavy, and bot.manifests reads manifests without them
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for path, module in model.named_modules():
        if module is head or "lora_" in path or not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        parts = path.split(".")
        names.add(parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1])
    return sorted(names)


def lora_targets(model: torch.nn.Module, requested: list[str]) -> list[str]:
    """The LoRA target names to use on ``model`` for a manifest's ``requested`` list.

    The default list (Llama's names, what `bot add` writes) becomes every linear layer
    of a model that lacks those names. A list the user chose keeps the names the model
    has (the others are logged); if it has none of them, that is an error.

    Raises:
        AdapterError: a hand-written list names no layer of this model (the message
            lists the layers it has).
    """
    present = linear_layer_names(model)
    kept = [n for n in requested if n in present]
    if len(kept) == len(requested) and kept:
        return kept
    arch = getattr(model.config, "model_type", type(model).__name__)
    missing = [n for n in requested if n not in present]
    if not present:
        raise BackboneError(f"the {arch} backbone has no linear layers for LoRA to adapt. "
                            "Fix: choose a transformers causal LM with nn.Linear/Conv1D layers")
    if sorted(requested) == sorted(DEFAULT_TARGET_MODULES):
        log.info("%s backbone: LoRA goes on its linear layers %s (it has no %s)", arch, present,
                 missing)
        return present
    if kept:
        log.warning("LoRA targets %s do not exist in this %s backbone; adapting %s only",
                    missing, arch, kept)
        return kept
    raise AdapterError(f"none of {requested} is a linear layer of this {arch} backbone; its "
                       f"layers are {present}. Fix: name some of those, or remove "
                       "lora.target_modules to adapt every linear layer")


def targets_are_conv1d(model: torch.nn.Module, targets: list[str]) -> bool:
    """True when the targets are GPT-2-style Conv1D layers (weights stored transposed)."""
    from transformers.pytorch_utils import Conv1D  # lazy: transformers is heavy

    wanted = set(targets)
    return any(isinstance(m, Conv1D) and path.rsplit(".", 1)[-1] in wanted
               for path, m in model.named_modules())


def prepare_tokenizer(tok, name: str = ""):
    """Give ``tok`` a pad token and a chat template when it lacks them; returns ``tok``.

    A missing pad token borrows the end-of-sequence token (padding is always masked out);
    a missing chat template gets ChatML. Adding new tokens would change the vocabulary,
    which the backbone's embeddings cannot follow, so nothing is added.
    """
    if tok.pad_token_id is None:
        fallback = tok.eos_token or tok.unk_token or tok.bos_token
        if fallback is None:
            raise BackboneError(f"the tokenizer of backbone {name!r} has no pad, eos, unk or bos "
                                "token to pad batches with. Fix: set tokenizer.pad_token in the "
                                "backbone folder's tokenizer_config.json")
        tok.pad_token = fallback
    if not getattr(tok, "chat_template", None):
        log.info("backbone %s has no chat template; using ChatML for generation adapters", name)
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    return tok


def model_from_weights(backbone, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (peft-free) copy of ``backbone``'s architecture holding ``state``'s tensors.

    The skeleton is built on the meta device, so no random weights are allocated and
    initialised first (minutes and gigabytes for a multi-billion model); ``state`` is
    assigned without a copy. Buffers left out of state dicts (rotary tables) are taken
    from the backbone, which has the same module paths outside its LoRA layers.
    """
    # lazy: torch and transformers are heavy, and bot.manifests reads manifests without them
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(backbone.base.config, dtype=torch.float32)
    model.load_state_dict(state, strict=False, assign=True)
    for path, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = path.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            module.register_buffer(leaf, backbone.base.get_buffer(path), persistent=False)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise BackboneError(f"cannot rebuild the {model.config.model_type} backbone for serving: "
                            f"no weights for {missing[:3]}")
    return model.eval()
