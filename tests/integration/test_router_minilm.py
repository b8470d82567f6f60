"""The router on the real MiniLM encoder routes obvious turns (marked `integration`)."""

from __future__ import annotations

import pytest

from bot.routing import HANDWRITTEN, Router, load_encoder, load_turns

DATA = HANDWRITTEN  # the hand-written turns ship with the package (bot/routing/chat_turns.jsonl)


@pytest.mark.integration
def test_real_encoder_routes_obvious_turns():
    router = Router(load_encoder(), fallback="assistant")
    router.add_route("chat", ["hi, how are you?", "good night, see you tomorrow",
                              "got any good jokes?", "I'm so tired today", "thanks, you're great"])
    router.add_route("assistant", ["can you help me plan my weekend?", "what's the capital of Peru?",
                                   "write a short poem about the sea", "how do magnets work?",
                                   "explain what a mortgage is"])
    router.add_route("sentiment", ["I absolutely loved this film", "the product broke after a day, awful",
                                   "the waiter was rude and the soup was cold",
                                   "best purchase I've made all year", "what a boring, overlong book"])
    router.add_route("topic", ["Shares slide as the bank cuts its profit forecast",
                               "Prime minister calls a snap general election",
                               "Liverpool beat Chelsea 3-1 to top the league",
                               "Tech giant unveils a faster smartphone chip",
                               "Actor wins best supporting role at the Oscars"])
    report = router.fit(load_turns(DATA))  # the hand-written turns are the held-out set
    assert report["accuracy"] >= 0.75, report  # four routes from five examples each (77 % here)
    turns = {"Hey there! How's your day going?": "chat",
             "This vacuum cleaner is fantastic, I love it!": "sentiment",
             "Oil prices jump after OPEC agrees to cut production": "topic"}
    for text, expected in turns.items():
        assert router.route(text).adapter == expected, router.route(text).reason
    follow = router.route("what about: Arsenal sign a new striker for 50 million", previous="sentiment")
    assert follow.adapter == "topic", follow.reason
