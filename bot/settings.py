"""Every ``BOT_*`` environment variable, in one place: its meaning, its default, its reader.

Code never reads ``os.environ["BOT_..."]`` itself; it calls :func:`get` (or one of the
typed readers below) with a name from :data:`SETTINGS`, so this table is the whole list
(``tests/unit`` checks that no other module reads a ``BOT_`` variable). Values are read
when asked for, not at import: the benchmarks and tests set some of them for a child
process or a block of code. ``bot info`` prints the table with the values in effect.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from bot.errors import BotError


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None
    meaning: str
    secret: bool = False


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("BOT_CACHE", "~/.cache/bot", "where the converted backbone, router caches, kernel "
            "choices and llama-server builds are kept"),
    Setting("BOT_ADAPTERS", None, "the adapters folder when --adapters-dir is not given "
            "(default: ./adapters, else the folder shipped with the package)"),
    Setting("BOT_BACKBONE", None, "the backbone when --backbone is not given (a folder, a "
            ".gguf file or a hub id already cached; default: the embedded SmolLM2-135M)"),
    Setting("BOT_DEVICE", "auto", "auto|cpu|cuda|mps when --device is not given"),
    Setting("BOT_LOAD_IN", "auto", "weight precision auto|fp32|bf16|8bit|4bit when --load-in "
            "is not given"),
    Setting("BOT_COMPUTE", "auto", "fp32|bf16: the compute dtype of training and "
            "classification passes (auto: bf16 where the CPU has it natively)"),
    Setting("BOT_KERNEL", None, "force the engine's matmul kernel(s), e.g. w8 or w8,bf16 "
            "(default: measured once per CPU, bot.engine.tuning)"),
    Setting("BOT_NATIVE", "auto", "auto|off: the compiled decode step (bot.engine.native; "
            "built once with the system's C++ compiler, else the Python step runs)"),
    Setting("BOT_ENGINE", "torch", "torch|llamacpp: the terminal chat's decoder when --engine "
            "is not given"),
    Setting("BOT_LLAMACPP_PATH", None, "a site-packages folder holding llama-cpp-python, for "
            "the optional llama.cpp engine and bot bench"),
    Setting("BOT_TRAIN_THREADS", None, "torch threads for training (default: all cores)"),
    Setting("BOT_TRAIN_CACHE_MB", "1024", "memory the frozen-layer training cache may take "
            "before it moves to a memory-mapped file"),
    Setting("BOT_API_KEY", None, "bot serve's API key when --api-key is not given (not shown "
            "by ps, unlike the flag)", secret=True),
    Setting("BOT_SERVE_PORT", "8000", "bot serve's port when --port is not given"),
    Setting("BOT_PORT", "7860", "bot demo's port when --port is not given"),
)}


def get(name: str, default: str | None = None) -> str | None:
    """The value of setting ``name`` now (its table default when unset and no ``default``)."""
    if name not in SETTINGS:
        raise KeyError(f"{name} is not a bot setting; known: {sorted(SETTINGS)}")
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default if default is not None else SETTINGS[name].default
    return value.strip()


def get_int(name: str) -> int | None:
    """``get`` as a whole number (None when unset); a bad value names the variable."""
    value = get(name)
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        raise BotError(f"{name}={value!r} is not a number. Fix: set it to a whole number or "
                       f"unset it ({SETTINGS[name].meaning})") from None


@contextlib.contextmanager
def override(name: str, value: str) -> Iterator[None]:
    """Set ``name`` to ``value`` for a block of code, then put back what was there."""
    if name not in SETTINGS:
        raise KeyError(f"{name} is not a bot setting; known: {sorted(SETTINGS)}")
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def describe() -> list[tuple[str, str, str]]:
    """(name, value in effect, meaning) for every setting; secrets are masked."""
    rows = []
    for s in SETTINGS.values():
        raw = os.environ.get(s.name)
        if raw and s.secret:
            shown = "(set)"
        elif raw:
            shown = raw
        else:
            shown = f"{s.default} (default)" if s.default is not None else "(unset)"
        rows.append((s.name, shown, s.meaning))
    return rows
