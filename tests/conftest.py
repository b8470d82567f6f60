"""Shared fixtures and session setup. The builders they use live in tests/helpers.py.

A tiny random Llama with a byte-level tokenizer, built in memory: no download and no bundled
weights, so the unit tests run in seconds on a CPU.

Nothing heavy is imported here at module level: with ``pytest -n`` (``make test-fast``) the
controlling process loads this file but runs no test, so torch and transformers are imported
only by the workers (through the test modules and the fixtures below).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and spare cores keep parallel runs fast."""
    # lazy: keeps the controlling process of `pytest -n` free of torch (see the module docstring)
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _native_loop_loaded():
    """Build or load the compiled decode loop once per worker, in the real ``$BOT_CACHE``.

    Tests that point BOT_CACHE at a temporary folder would otherwise rebuild it there
    (about 30 s); loaded once, the process keeps it (bot.engine.native).
    """
    from bot.engine import native  # lazy: see the module docstring

    native.module()


@pytest.fixture
def tiny_backbone():
    # lazy: helpers imports transformers (see the module docstring)
    from helpers import make_tiny_backbone

    return make_tiny_backbone()


@pytest.fixture
def tokenizer():
    # lazy: helpers imports transformers (see the module docstring)
    from helpers import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One trained classify adapter folder ('pets'); tests copy it, never change it."""
    # lazy: helpers and training import torch and transformers (see the module docstring)
    from helpers import make_tiny_backbone, toy_spec

    from bot.training.train import train_adapter

    base = tmp_path_factory.mktemp("trained")
    spec = toy_spec(base, epochs=0.5)
    train_adapter(spec, make_tiny_backbone(), spec.folder)
    return spec.folder
