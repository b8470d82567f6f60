"""Generated replies for ``/v1/chat/completions`` and ``/v1/completions``: one machinery, two shapes.

Both endpoints submit one engine request per prompt (chat: one; completions: one per
prompt string) and then either wait for every reply (polling the client, so a request
whose client left frees its rows at once) or stream server-sent events. Only the JSON
around the text differs: :class:`Shape` writes it (OpenAI's ``chat.completion`` with
``message``/``delta``, or the legacy ``text_completion`` with ``text``), including
OpenAI's two logprob formats.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field, replace

from fastapi.responses import JSONResponse, StreamingResponse

from bot.engine import Event, SamplingParams
from bot.errors import ApiError, QueueFull, ServeError, UnknownModel

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.05  # a waiting request checks its client this often (and at every token)


def serve_error(err: ServeError) -> ApiError:
    """The HTTP answer to an error the engine or the server state raised on purpose."""
    if isinstance(err, QueueFull):
        return ApiError(429, str(err), err.code, headers={"Retry-After": "1"})
    if isinstance(err, UnknownModel):
        return ApiError(404, str(err), err.code, "model")
    return ApiError(getattr(err, "status", 400), str(err),
                    getattr(err, "code", "invalid_request_error"), getattr(err, "param", None))


def gone(what: str) -> JSONResponse:
    """The answer to a client that went away: nobody reads it; /metrics counts it as 499."""
    log.info("%s request dropped: the client disconnected (499)", what)
    return JSONResponse({}, status_code=499)


@dataclass
class Shape:
    """How one endpoint writes its replies (chat or text completion) and their logprobs.

    Args:
        chat: OpenAI's chat.completion shape; else the legacy text_completion one.
        model: the ``model`` the request named (echoed back).
        tokenizer: turns logprob token ids into text.
        extra: fields added to every body (the ``bot`` field: who answered and why).
    """

    chat: bool
    model: str
    tokenizer: object
    extra: dict = field(default_factory=dict)
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    offsets: dict = field(default_factory=dict)  # text_offset so far per choice (completions)

    def __post_init__(self):
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def logprobs(self, index: int, items: list) -> dict | None:
        """OpenAI's logprobs object for ``items`` = [(token id, (logprob, [(id, logprob)]))]."""
        if not items:
            return None
        word = self._word
        if self.chat:
            return {"content": [
                {"token": word(t), "logprob": lp, "bytes": list(word(t).encode()),
                 "top_logprobs": [{"token": word(a), "logprob": alp, "bytes": list(word(a).encode())}
                                  for a, alp in top]}
                for t, (lp, top) in items]}
        offsets, at = [], self.offsets.get(index, 0)
        for t, _ in items:
            offsets.append(at)
            at += len(word(t))
        self.offsets[index] = at
        return {"tokens": [word(t) for t, _ in items],
                "token_logprobs": [lp for _, (lp, _) in items],
                "top_logprobs": [_first_wins([(word(a), alp) for a, alp in top])
                                 for _, (_, top) in items],
                "text_offset": offsets}

    def _word(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def choice(self, index: int, text: str, reason: str | None, items: list) -> dict:
        body = {"index": index, "finish_reason": reason, "logprobs": self.logprobs(index, items)}
        if self.chat:
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["text"] = text
        return body

    def delta(self, index: int, text: str | None, reason: str | None, items: list,
              role: bool = False) -> dict:
        body = {"index": index, "finish_reason": reason, "logprobs": self.logprobs(index, items)}
        if self.chat:
            delta: dict = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            body["delta"] = delta
        else:
            body["text"] = text or ""
        return body

    def body(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None:
            out["usage"] = usage
        out.update(self.extra)
        return out

    def chunk(self, choice: dict, usage: dict | None = None, extra: bool = False) -> str:
        out = {"id": self.id, "object": f"{self.object}.chunk" if self.chat else self.object,
               "created": self.created, "model": self.model, "choices": [choice]}
        if usage is not None:
            out["usage"] = usage
        if extra:
            out.update(self.extra)
        return f"data: {json.dumps(out)}\n\n"


def _first_wins(pairs: list) -> dict:
    """A dict of (text, logprob) pairs, best first: tokens decoding to the same text (bytes of
    half a UTF-8 character all read "\ufffd") keep the best one's logprob."""
    out: dict = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def ready_reply(shape: Shape, text: str, headers: dict, stream: bool):
    """A reply known before any decoding (a classify adapter answering a chat turn)."""
    if stream:
        async def once():
            yield shape.chunk(shape.delta(0, text, None, [], role=True), extra=True)
            yield shape.chunk(shape.delta(0, None, "stop", []))
            yield "data: [DONE]\n\n"
        return StreamingResponse(once(), media_type="text/event-stream", headers=headers)
    return JSONResponse(shape.body([shape.choice(0, text, "stop", [])], usage(0, 0)),
                        headers=headers)


@dataclass
class Job:
    """One prompt to decode: its token ids and its reply's token budget."""

    ids: list[int]
    max_tokens: int


async def generate(state, request, jobs: list[Job], adapter, params: SamplingParams,
                   shape: Shape, headers: dict, stream: bool, what: str, in_thread):
    """Decode every job on the engine and answer as one response (JSON, or SSE when ``stream``).

    Every job is checked before the first is submitted; a refusal part way (queue full)
    cancels the ones already queued.
    """
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def submit_all() -> list:
        reqs = []
        try:
            for i, job in enumerate(jobs):
                reqs.append(state.scheduler.submit(
                    job.ids, adapter, replace(params, max_tokens=job.max_tokens),
                    lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev))))
        except ServeError as err:
            for r in reqs:
                r.cancel()
            raise serve_error(err) from err
        return reqs

    # a grammar gives each reply a matcher (about 1 ms each on a 49k vocabulary): off the loop
    reqs = submit_all() if params.grammar is None else await in_thread(submit_all)
    if stream:
        return StreamingResponse(_sse(reqs, events, shape), media_type="text/event-stream",
                                 headers=headers)
    n = len(jobs)
    texts, items, finals = [""] * n, [[] for _ in range(n)], [None] * n
    try:
        while any(f is None for f in finals):
            try:
                i, ev = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                i, ev = 0, None
            # checked at every token too: events keep coming while it decodes (issue 28)
            if await request.is_disconnected():
                return gone(what)  # (finally: the engine frees the rows before its next step)
            if ev is not None:
                texts[i] += ev.delta
                items[i] += list(zip(ev.token_ids, ev.logprobs))
                if ev.finish_reason:
                    finals[i] = ev
    finally:
        for r in reqs:
            r.cancel()
    failed = next((f for f in finals if f.error), None)
    if failed is not None:
        state.metrics.unexpected(request.url.path, "EngineError")
        raise ApiError(500, failed.error, "internal_error")
    choices = [shape.choice(i, texts[i], f.finish_reason, items[i]) for i, f in enumerate(finals)]
    total = usage(sum(f.prompt_tokens for f in finals), sum(f.completion_tokens for f in finals))
    return JSONResponse(shape.body(choices, total), headers=headers)


async def _sse(reqs, events: asyncio.Queue, shape: Shape):
    """Server-sent events; when the client goes away every row of the request is freed at once."""
    left, prompt, completion = len(reqs), 0, 0
    try:
        for i in range(len(reqs)):  # (the ``bot`` field rides on each choice's first chunk)
            yield shape.chunk(shape.delta(i, "", None, [], role=shape.chat), extra=True)
        while left:
            i, ev = await events.get()
            if ev.error:
                err = {"error": {"message": ev.error, "type": "server_error", "code": "internal_error"}}
                yield f"data: {json.dumps(err)}\n\n"
                break
            if ev.delta or ev.logprobs:
                yield shape.chunk(shape.delta(i, ev.delta, None,
                                              list(zip(ev.token_ids, ev.logprobs))))
            if ev.finish_reason:
                left -= 1
                prompt, completion = prompt + ev.prompt_tokens, completion + ev.completion_tokens
                yield shape.chunk(shape.delta(i, None, ev.finish_reason, []),
                                  usage(prompt, completion) if left == 0 else None)
        yield "data: [DONE]\n\n"
    finally:
        for r in reqs:
            r.cancel()
