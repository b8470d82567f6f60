"""bot: one causal-LM backbone carrying many LoRA adapters, a router and a chat demo.

Public API::

    from bot import Backbone, ChatSession, Router, AdapterSpec
    bb = Backbone.load()                      # embedded SmolLM2-135M-Instruct
    session = ChatSession.from_dir(bb)        # loads adapters/* and the router
    turn = session.send("The battery died after a day. Awful.")
    turn.adapter, turn.reply, turn.route.score
"""

import os

# With more busy threads than cores (a demo beside a training run, two sessions),
# OpenMP's default spin-waiting made LoRA steps 5-8x slower here; passive waiting does not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .backbone import Backbone  # noqa: E402
from .errors import AdapterError  # noqa: E402, BotError, DataError, FingerprintMismatch, SpecError
from .spec import AdapterSpec  # noqa: E402

__all__ = ["Backbone", "AdapterSpec", "BotError", "AdapterError", "DataError",
           "FingerprintMismatch", "SpecError", "ChatSession", "Router", "RouteChoice", "Turn"]


def __getattr__(name):
    # lazy: the router pulls in sentence-transformers, the session pulls in the router
    if name in ("Router", "RouteChoice"):
        from . import router

        return getattr(router, name)
    if name in ("ChatSession", "Turn"):
        from . import chat

        return getattr(chat, name)
    raise AttributeError(name)
