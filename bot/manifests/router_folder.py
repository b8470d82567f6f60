"""Where the router's second stage lives under an adapters folder: ``.router/router``.

The stage (bot.routing.second) is an adapter folder of its own, hidden from scans; versions
(``bot rollback``), ``bot list`` and the stage itself find it, and the routes it was fitted
for, here.
"""

from __future__ import annotations

import json
from pathlib import Path

FOLDER = ".router"  # under ADAPTERS_DIR; dot folders are not adapters (bot.manifests.spec.scan)
NAME = "router"
STAGE_FILE = "stage.json"


def folder_of(adapters_dir) -> Path:
    """Where the route adapter of the routes under ``adapters_dir`` lives."""
    return Path(adapters_dir) / FOLDER / NAME


def fitted_routes(folder: Path) -> list[str] | None:
    """The routes the stage in ``folder`` was fitted for (its ``stage.json``), or None."""
    try:
        routes = json.loads((Path(folder) / STAGE_FILE).read_text(encoding="utf-8"))["routes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [str(r) for r in routes] if isinstance(routes, list) else None
