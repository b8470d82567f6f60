"""Validation signal for the chat adapter's reply length (README "Chat adapter").

    python scripts/chat_length_val.py [ADAPTERS_DIR]

Median reply length (words) of ``/chat`` and of the bare backbone on 40 questions from the
TREC *validation* split (the self-distilled prompts come from the training split; the
hand-written tests/data/instructions.jsonl is never used here), greedy, 160-token cap as in
``bot eval --instructions``. Prints the ratio used to choose the chat recipe.
"""

from __future__ import annotations

import random
import statistics
import sys

from bot.chat import ChatSession
from bot.eval.helpful import _replies, words
from bot.manifests.data import load_source, split
from bot.training.distill import PROMPT_SOURCE


def main(adapters_dir: str | None = None, n: int = 40, max_tokens: int = 160) -> float:
    rows = split(load_source(PROMPT_SOURCE, "classify"), seed=0).val
    prompts = random.Random(1).sample(sorted({r["text"] for r in rows}), n)
    session = ChatSession.from_dir(adapters_dir=adapters_dir)
    base = statistics.median(map(words, _replies(session, prompts, None, max_tokens)))
    chat = statistics.median(map(words, _replies(session, prompts, "chat", max_tokens)))
    print(f"{n} TREC validation questions: median words base {base}, chat {chat}, "
          f"ratio {chat / base:.3f}")
    return chat / base


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
