"""Shared fixtures and session setup. The builders they use live in tests/helpers.py.

A tiny random Llama with a byte-level tokenizer, built in memory: no download and no bundled
weights, so the unit tests run in seconds on a CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models gain nothing from threads, and spare cores keep a parallel training run fast
torch.set_num_threads(1)

# after the variables above: transformers reads HF_HUB_OFFLINE when it is imported
from helpers import make_tiny_backbone, make_tokenizer  # noqa: E402


@pytest.fixture
def tiny_backbone():
    return make_tiny_backbone()


@pytest.fixture
def tokenizer():
    return make_tokenizer()
