"""bot: one causal-LM backbone carrying many LoRA adapters, a router and a chat demo.

Public API::

    from bot import Backbone, ChatSession, Router, AdapterSpec
    bb = Backbone.load()                      # embedded SmolLM2-135M-Instruct
    session = ChatSession.from_dir(bb)        # loads adapters/* and the router
    turn = session.send("The battery died after a day. Awful.")
    turn.adapter, turn.reply, turn.route.score
"""

from .backbone import Backbone
from .errors import AdapterError, BotError, DataError, FingerprintMismatch, SpecError
from .spec import AdapterSpec

__all__ = ["Backbone", "AdapterSpec", "BotError", "AdapterError", "DataError",
           "FingerprintMismatch", "SpecError", "ChatSession", "Router", "RouteChoice", "Turn"]


def __getattr__(name):
    # lazy: the router pulls in sentence-transformers, the session pulls in the router
    if name in ("Router", "RouteChoice"):
        from . import routing

        return getattr(routing, name)
    if name in ("ChatSession", "Turn"):
        from . import chat

        return getattr(chat, name)
    raise AttributeError(name)
