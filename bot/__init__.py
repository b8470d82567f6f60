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

__all__ = ["Backbone", "AdapterSpec", "BotError", "AdapterError", "DataError",
           "FingerprintMismatch", "SpecError", "ChatSession", "Router", "RouteChoice", "Turn"]


def __getattr__(name):
    # lazy: the backbone pulls in torch and transformers, the router sentence-transformers and
    # the session the router; importing any bot module (bot.manifests for `bot list`, a
    # subprocess that only swaps folders) should not pay for them
    if name == "Backbone":
        from bot.model import backbone  # lazy: see above

        return backbone.Backbone
    if name in ("Router", "RouteChoice"):
        from bot import routing  # lazy: see above

        return getattr(routing, name)
    if name in ("ChatSession", "Turn"):
        from bot import chat  # lazy: see above

        return getattr(chat, name)
    raise AttributeError(name)
