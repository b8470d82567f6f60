"""A fitted router on disk: ``router.json`` (settings, examples) + ``routes.safetensors``.

``routes.safetensors`` holds each route's example embeddings and the embedding of ``PROBE``,
so a router is never loaded with another encoder than the one that embedded it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from bot.errors import DataError
from bot.routing.features import NgramFeatures
from bot.util.fsutil import atomic_dir_write

FORMAT_VERSION = 3  # 2: per-route thresholds and the optional linear head; 3: n-gram features in the head
PROBE = "The router checks that it is loaded with the encoder it was saved with."


def write_router(folder, config: dict, embeddings: dict[str, np.ndarray], probe: np.ndarray,
                 extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write both files into ``folder`` atomically (a crash leaves the old router or none).

    Args:
        extra: more tensors to store (the fitted head).
    """
    tensors = {f"route.{name}": emb for name, emb in embeddings.items()} | dict(extra or {})
    tensors["probe"] = probe
    config = {"format_version": FORMAT_VERSION, **config}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "routes.safetensors"))
        (tmp / "router.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    return atomic_dir_write(Path(folder), write)


def read_router(folder) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, tensors) of a saved router; refuses another ``format_version``.

    Raises:
        DataError: a file is missing or unreadable, or was written in another format.
    """
    folder = Path(folder)
    try:
        config = json.loads((folder / "router.json").read_text(encoding="utf-8"))
        tensors = load_file(str(folder / "routes.safetensors"))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read a saved router from {folder}: {err}") from err
    version = config.get("format_version") if isinstance(config, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(f"{folder / 'router.json'} has format_version {version!r}, but this bot "
                        f"reads format {FORMAT_VERSION}. Fix: rebuild the router (add_route() and "
                        "fit(), or delete the folder and let build_router() make it again)")
    return config, tensors


def head_to_disk(head: dict | None) -> tuple[dict, dict[str, np.ndarray]]:
    """The fitted head (bot.routing.fitting.fit_route_head) as router.json keys and tensors."""
    if head is None:
        return {"head_routes": None}, {}
    ngrams = head.get("ngrams")
    config = {"head_routes": head["routes"], "head_embedding_weight": head["embedding_weight"],
              "head_ngrams": ngrams.to_config() if ngrams else None}
    tensors = {"head.weight": head["weight"], "head.bias": head["bias"]}
    return config, tensors | (ngrams.tensors() if ngrams else {})


def head_from_disk(config: dict, tensors: dict[str, np.ndarray]) -> dict | None:
    """The head that ``head_to_disk`` wrote, or None when the router has none."""
    if not config.get("head_routes"):
        return None
    ngrams = config.get("head_ngrams")
    return {"routes": list(config["head_routes"]), "weight": tensors["head.weight"],
            "bias": tensors["head.bias"], "embedding_weight": float(config["head_embedding_weight"]),
            "ngrams": NgramFeatures.from_saved(ngrams, tensors) if ngrams else None}


def same_encoder(probe: np.ndarray, saved: np.ndarray) -> bool:
    """True when the probe sentence embeds (almost) as it did when the router was saved."""
    return probe.shape == saved.shape and float(probe @ saved) >= 0.99
