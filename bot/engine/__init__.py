"""One generation engine for every caller (chat, demo, serve, eval, bench, distill).

* :class:`Scheduler` (bot.engine.scheduler): continuous batching, requests in, token
  events out, each request with its own adapter and SamplingParams.
* runners (bot.engine.runner): the lean batched step (bot.engine.lean) for Llama-style
  families, transformers' forward for the others.
* kernels (bot.engine.precision) and their measured choice (bot.engine.tuning).
* the optional llama.cpp backend (bot.engine.llamacpp).
"""

from bot.engine.sampling import SamplingParams
from bot.engine.scheduler import Event, Request, Scheduler
from bot.errors import QueueFull, ServeError, UnknownModel

__all__ = ["Scheduler", "SamplingParams", "Event", "Request", "ServeError", "QueueFull",
           "UnknownModel"]
