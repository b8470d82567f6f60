"""``bot merge NEW --from a:0.5,b:0.5``: a new generation adapter folder, merged offline by peft.

peft's ``add_weighted_adapter`` combines loaded LoRA adapters into one:

* ``linear``: the weighted sum of the A matrices and of the B matrices (each side scaled by
  sqrt(weight * scale)); needs equal ranks. Not the sum of the adapters' deltas (it has
  cross terms), but the rank stays the same.
* ``cat``: A and B concatenated (rank = the sum of ranks), so the delta is exactly
  sum_i weight_i * scale_i * B_i A_i: the same as serving the mixture ``a:0.5+b:0.5`` per
  request (bot.engine.lora.Mixture), kept as a folder.
* ``ties`` and ``dare_ties``: TIES-merging (Yadav et al. 2023, trim to ``density``, elect
  signs, average agreeing values) and its DARE variant (random drop to ``density`` and
  rescale; ``--seed`` makes it repeatable), as peft implements them.

The folder (peft weights + an adapter.yaml of kind ``generate`` naming its sources) is
written to a temporary folder and swapped in whole (bot.util.fsutil.atomic_dir_write), so it
then serves (``bot serve``, ``/v1/load_lora_adapter``) and exports like any trained adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bot.engine.lora import Mixture
from bot.errors import BotError
from bot.manifests.spec import AdapterSpec, check_adapter_name
from bot.util.fsutil import atomic_dir_write

METHODS = ("linear", "cat", "ties", "dare_ties")


def parse_sources(text: str) -> list[tuple[str, float]]:
    """``a:0.5,b:0.5`` (or ``+`` between them) as [(name, weight)]; BotError saying what is wrong."""
    try:
        return list(Mixture.parse(text.replace(",", "+")).parts)
    except ValueError as err:
        raise BotError(f"--from {text!r}: {err}. Fix: write it as NAME:WEIGHT,NAME:WEIGHT, e.g. "
                       "chat:0.5,mine:0.5") from None


def check_merge(adapters_dir, new: str, sources: list[tuple[str, float]], method: str = "linear",
                density: float = 0.5) -> list[AdapterSpec]:
    """Everything about a merge that can be checked without the backbone; the sources' specs.

    Raises:
        BotError: a bad name or method, fewer than two sources, one that is missing or not a
            generation adapter, or ``new`` existing already.
    """
    check_adapter_name(new, "bot merge NEW")
    if method not in METHODS:
        raise BotError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if not 0 < density <= 1:
        raise BotError(f"--density must be in (0, 1], got {density}")
    if len(sources) < 2:
        raise BotError("--from needs at least two adapters to merge")
    dest = Path(adapters_dir) / new
    if dest.exists() or new in [n for n, _ in sources]:
        raise BotError(f"{dest} exists already. Fix: pick another name (or `bot rm {new}` first)")
    specs = []
    for name, _ in sources:
        spec = AdapterSpec.from_dir(Path(adapters_dir) / name)
        if spec.kind != "generate":
            raise BotError(f"'{name}' is a {spec.kind} adapter; only generation adapters merge "
                           "(a classify adapter's head would not carry over)")
        specs.append(spec)
    return specs


def merge_adapters(backbone, adapters_dir, new: str, sources: list[tuple[str, float]],
                   method: str = "linear", density: float = 0.5, seed: int = 0) -> Path:
    """Merge generation adapters ``sources`` into ``adapters_dir/new``; returns the folder.

    Raises:
        BotError: what :func:`check_merge` refuses, or peft refusing the merge (e.g.
            ``linear`` over different ranks); nothing is written then.
    """
    specs = check_merge(adapters_dir, new, sources, method, density)
    adapters_dir = Path(adapters_dir)
    dest = adapters_dir / new
    for spec in specs:
        backbone.load_adapter(spec.name, adapters_dir / spec.name, spec.backbone.get("fingerprint"))
    names, weights = [n for n, _ in sources], [w for _, w in sources]
    extra = {"density": density} if method in ("ties", "dare_ties") else {}
    torch.manual_seed(seed)  # dare_ties drops at random
    try:
        with backbone.lock:
            backbone.peft.add_weighted_adapter(names, weights, new, combination_type=method, **extra)
    except ValueError as err:
        fix = " Fix: use --method cat (any ranks)" if method == "linear" else ""
        raise BotError(f"peft cannot merge {names} with {method}: {err}.{fix}") from err
    label = ", ".join(f"{n} x{w:g}" for n, w in sources)
    spec = specs[0].replace(
        name=new, description=f"merged by `bot merge` ({method}) from {label}",
        route_examples=[], route_description="", data={}, route_data={}, folder=None)

    def write(tmp: Path) -> None:
        backbone.save_adapter(new, tmp)
        spec.save(tmp)

    try:
        return atomic_dir_write(dest, write)
    finally:
        backbone.drop_adapter(new)
