"""Routing: which adapter answers a chat turn.

* ``router``: the ``Router`` front door (routes, decisions, fit, evaluate, save/load);
* ``fitting``: pure functions from similarities, scores and labels to the fitted values;
* ``commands``: ``/name`` commands and follow-up markers;
* ``cache``: turn embeddings and their LRU cache;
* ``encoder``: the bundled sentence encoder;
* ``store``: the on-disk format (``FORMAT_VERSION``);
* ``turns``: labelled turn files and the hand-written turns;
* ``route_data``: the texts a router is built, fitted and scored on;
* ``second``: the second stage as served; ``abstain``: when to abstain;
* ``build``: a fitted router from the adapter manifests, cached under ``$BOT_CACHE``.
"""

from bot.routing.build import build_router
from bot.routing.commands import HELP, split_follow_up
from bot.routing.encoder import load_encoder
from bot.routing.route_data import route_texts, router_test_set
from bot.routing.router import DEFAULT_MARGIN, RouteChoice, Router
from bot.routing.store import FORMAT_VERSION
from bot.routing.turns import HANDWRITTEN, load_handwritten, load_turns

__all__ = ["Router", "RouteChoice", "build_router", "load_encoder", "load_turns", "load_handwritten",
           "router_test_set", "route_texts", "split_follow_up", "HELP", "DEFAULT_MARGIN",
           "FORMAT_VERSION", "HANDWRITTEN"]
