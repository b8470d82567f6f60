"""bot: one causal-LM backbone carrying many LoRA adapters, a router and a chat demo.

Public API::

    from bot import Backbone, ChatSession, Router, AdapterSpec
    bb = Backbone.load()                      # embedded SmolLM2-135M-Instruct
    session = ChatSession.from_dir(bb)        # loads adapters/* and the router
    turn = session.send("The battery died after a day. Awful.")
    turn.adapter, turn.reply, turn.route.score
"""

from bot.errors import AdapterError, BotError, DataError, FingerprintMismatch, SpecError
from bot.manifests.spec import AdapterSpec
from bot.model.backbone import Backbone

__all__ = ["Backbone", "AdapterSpec", "BotError", "AdapterError", "DataError",
           "FingerprintMismatch", "SpecError", "ChatSession", "Router", "RouteChoice", "Turn"]


def __getattr__(name):
    # lazy: the router pulls in sentence-transformers, the session pulls in the router
    if name in ("Router", "RouteChoice"):
        from bot import routing  # lazy: see above

        return getattr(routing, name)
    if name in ("ChatSession", "Turn"):
        from bot import chat  # lazy: see above

        return getattr(chat, name)
    raise AttributeError(name)
