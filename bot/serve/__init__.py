"""Serving: many users and many adapters sharing one batched backbone.

``Scheduler`` (continuous batching over a multi-LoRA engine) is used by the
OpenAI-compatible server (``bot serve``), the Gradio demo and ``bot chat``.
"""

from .sampling import SamplingParams
from .scheduler import Event, QueueFull, Scheduler, ServeError, UnknownModel

__all__ = ["Scheduler", "SamplingParams", "Event", "ServeError", "QueueFull", "UnknownModel"]
