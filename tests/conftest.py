"""Shared fixtures and session setup. The builders they use live in tests/helpers.py.

A tiny random Llama with a byte-level tokenizer, built in memory: no download and no bundled
weights, so the unit tests run in seconds on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models gain nothing from threads, and spare cores keep a parallel training run fast
torch.set_num_threads(1)

# after the variables above: transformers reads HF_HUB_OFFLINE when it is imported
from helpers import make_tiny_backbone, make_tokenizer, toy_spec  # noqa: E402

from bot.training.train import train_adapter  # noqa: E402


@pytest.fixture
def tiny_backbone():
    return make_tiny_backbone()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One trained classify adapter folder ('pets'); tests copy it, never change it."""
    base = tmp_path_factory.mktemp("trained")
    spec = toy_spec(base, epochs=0.5)
    train_adapter(spec, make_tiny_backbone(), spec.folder)
    return spec.folder
