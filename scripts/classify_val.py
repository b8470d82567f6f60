"""Score classify adapters on their VALIDATION split, the split used to choose a recipe.

Usage: python scripts/classify_val.py NAME ADAPTERS_DIR [ADAPTERS_DIR ...]

``bot train`` reports the held-out *test* split, which must not steer choices; this prints
accuracy per view (whole text, and e.g. headline) on the validation split, which training
never reads either, for the adapter NAME in each folder, so recipes can be compared on it.
"""

import sys

from bot.manifests.registry import load_task
from bot.manifests.spec import discover
from bot.model.backbone import Backbone
from bot.training.train import training_rows


def main(argv: list[str]) -> None:
    name, folders = argv[0], argv[1:]
    backbone = Backbone.load()
    for folder in folders:
        spec = next(s for s in discover(folder) if s.name == name)
        spec, splits = training_rows(spec)
        task = load_task(backbone, spec)
        result = task.evaluate(splits.val)
        views = " ".join(f"{view} {100 * m['accuracy']:.1f} % (n={m['n']})" for view, m in result.items())
        print(f"{folder}/{name}: validation {views}", flush=True)
        backbone.drop_adapter(name)


if __name__ == "__main__":
    main(sys.argv[1:])
