"""OpenAI-compatible HTTP API over the scheduler (``bot serve``).

Request and response shapes follow OpenAI's chat completions API, and the adapter
endpoints follow vLLM's (``/v1/load_lora_adapter``, ``/v1/classify``), so a client
written against ``bot serve`` moves to vLLM by changing only its base URL.
``model`` is an adapter name, the base model's name, or ``auto`` (the router picks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from ..engine import Event, SamplingParams
from ..errors import BotError, QueueFull, ServeError, UnknownModel
from .limits import Guard, error_type
from .state import ServerState, _untemplated  # noqa: F401 (tests import it from here)

log = logging.getLogger(__name__)

# torch.Generator.manual_seed takes any 64-bit value, signed or not
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1
DISCONNECT_POLL_S = 0.05  # a waiting request checks its client this often (and at every token)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Any = None

    @field_validator("content")
    @classmethod
    def _content(cls, value):
        """A string, null, or OpenAI's content parts, whose text parts carry a string."""
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(f"content must be a string or a list of content parts, got "
                             f"{type(value).__name__}")
        for i, part in enumerate(value):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValueError(f"content part {i} must be an object with a string 'type'")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} has type 'text' but its 'text' is "
                                 f"{type(part.get('text')).__name__}, not a string")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI's content parts: keep the text ones
            return "".join(p["text"] for p in self.content if p["type"] == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int = 1
    repetition_penalty: float | None = None  # vLLM's extra sampling parameter


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str]


class LoadRequest(BaseModel):
    lora_name: str
    lora_path: str | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error",
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}


def _error(status: int, message: str, code: str, param: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": error_type(status), "param": param,
                                   "code": code}}, status_code=status, headers=headers)


# pydantic names the branch of a union in an error's location ("str", "list[str]"): not a field
_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _param(loc) -> str | None:
    parts = [str(p) for p in loc if p != "body" and not (
        isinstance(p, str) and (p in _UNION_TAGS or "[" in p or "-" in p))]
    return ".".join(parts) or None


def _bad_body(errors: list[dict]) -> ApiError:
    """One 400 for pydantic's errors: the deepest one (a union lists one error per branch)."""
    if not errors:
        return ApiError(400, "invalid request body")
    first = max(errors, key=lambda e: len(_param(e.get("loc", ())) or ""))
    if first.get("type") == "json_invalid":
        msg = first.get("msg", "")
        if "surrogate" in msg or "hex escape" in msg:
            return ApiError(400, "the request body holds a lone UTF-16 surrogate escape "
                            "(\\ud800-\\udfff without its pair), which is not a character. Fix: "
                            "send valid Unicode text", "invalid_json")
        return ApiError(400, f"the request body is not valid JSON ({msg}). Fix: send one JSON "
                        "object with Content-Type: application/json", "invalid_json")
    if first.get("type") == "model_type":
        return ApiError(400, "the request body must be a JSON object", "invalid_request_error")
    where = _param(first.get("loc", ()))
    return ApiError(400, f"invalid request body: {where or 'body'}: {first.get('msg', '')}",
                    param=where)


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving ``state`` (backbone, adapters, router, scheduler)."""
    app = FastAPI(title="bot serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.bot = state
    # blocking work (parsing, the chat template, waits on the scheduler) runs here, never on
    # the event loop; a wait may last as long as a request, so the pool is as deep as the queue
    pool = ThreadPoolExecutor(max_workers=state.scheduler.max_queue + 8,
                              thread_name_prefix="bot-http")

    async def in_thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def parse(request: Request, model: type[BaseModel]):
        raw = await request.body()
        try:
            return await in_thread(model.model_validate_json, raw)
        except ValidationError as err:
            raise _bad_body(err.errors(include_url=False)) from None

    @app.exception_handler(ApiError)
    async def _api_error(_req, err: ApiError):
        return _error(err.status, err.message, err.code, err.param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, err: RequestValidationError):
        bad = _bad_body(list(err.errors()))
        return _error(bad.status, bad.message, bad.code, bad.param)

    @app.exception_handler(HTTPException)
    async def _http(req, err: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "error")
        message = str(err.detail)
        if err.status_code == 404:
            message = f"no endpoint {req.url.path[:100]}; see README 'Serve' for the endpoints"
        elif err.status_code == 405:
            allowed = (err.headers or {}).get("Allow", "")
            message = f"{req.method} is not allowed on {req.url.path}; use {allowed or 'another method'}"
        return _error(err.status_code, message, code, headers=err.headers)

    app.add_middleware(Guard, state=state)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": state.model_ids(), "in_flight": state.scheduler.in_flight(),
                "precision": state.scheduler.precision}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": state.model_cards()}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await parse(request, ChatRequest)
        request.state.model = body.model
        return await _chat(state, body, request, in_thread)

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await parse(request, ClassifyRequest)
        request.state.model = body.model
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        cap = state.limits.max_classify_inputs
        if len(texts) > cap:
            raise ApiError(400, f"input has {len(texts):,} texts, over this server's limit of "
                           f"{cap:,} per request (bot serve --max-classify-inputs). Fix: send them "
                           f"in requests of at most {cap:,}", "too_many_inputs", "input")
        if not texts or any(not t.strip() for t in texts):
            raise ApiError(400, "input must be a non-empty string or list of non-empty strings",
                           param="input")
        chars = state.limits.input_chars(state.scheduler.max_len)
        long = next((i for i, t in enumerate(texts) if len(t) > chars), None)
        if long is not None:
            raise ApiError(400, f"input text {long} has {len(texts[long]):,} characters, over this "
                           f"server's limit of {chars:,} (bot serve --max-input-chars). Fix: "
                           "shorten it (a classifier reads only its first tokens anyway)",
                           "input_too_long", "input")
        if body.model not in state.scheduler.classifiers:
            raise ApiError(404, f"'{_shown(body.model)}' is not a classify adapter; classify "
                           f"adapters: {sorted(state.scheduler.classifiers)}", "model_not_found",
                           "model")
        task = state.scheduler.classifiers[body.model]
        try:
            probs, tokens = await _watching(request, lambda gone: in_thread(
                state.classify, body.model, texts, gone))
        except ServeError as err:
            raise _serve_error(err) from err
        if probs is None:
            return _gone(state, "classify")
        data = [{"index": i, "label": max(p, key=p.get), "probs": list(p.values()),
                 "label_probs": p, "num_classes": len(p)} for i, p in enumerate(probs)]
        answer = {"id": f"classify-{uuid.uuid4().hex}", "object": "list",
                  "created": int(time.time()), "model": body.model, "labels": task.labels,
                  "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        # thousands of rows: encoded in the pool, not by FastAPI on the event loop
        return Response(await in_thread(_json_bytes, answer), media_type="application/json")

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        body = await parse(request, LoadRequest)
        request.state.model = body.lora_name
        _need_key(state)
        if not body.lora_path:
            raise ApiError(400, "lora_path is required: the adapter folder to load", param="lora_path")
        try:
            state.check_new_name(body.lora_name)
        except BotError as err:
            raise ApiError(400, str(err), param="lora_name") from err
        try:
            kind = await in_thread(state.load_adapter, body.lora_name, Path(body.lora_path))
        except BotError as err:
            raise ApiError(400, str(err), param="lora_path") from err
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' ({kind}) added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request):
        body = await parse(request, LoadRequest)
        request.state.model = body.lora_name
        _need_key(state)
        if body.lora_name not in state.tasks and body.lora_name not in state.scheduler.generators:
            raise ApiError(404, f"no adapter named '{_shown(body.lora_name)}' is loaded",
                           "model_not_found", "lora_name")
        await in_thread(state.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode()


def _shown(name: str, n: int = 60) -> str:
    """A client's string in a message: at most ``n`` characters (it may be megabytes)."""
    return name if len(name) <= n else f"{name[:n]}... ({len(name):,} characters)"


async def _watching(request: Request, start):
    """Run ``start(gone)`` (an awaitable) while polling the client; ``gone()`` turns true once it left.

    Returns ``(None, None)`` when the client left (the work is then dropped by the engine).
    """
    left = False

    def gone() -> bool:
        return left

    work = asyncio.ensure_future(start(gone))
    while not work.done():
        await asyncio.wait([work], timeout=DISCONNECT_POLL_S)
        if not work.done() and await request.is_disconnected():
            left = True
            try:
                await work
            except ServeError:
                pass
            return None, None
    return work.result()


def _gone(state: ServerState, what: str) -> JSONResponse:
    """The answer to a client that went away: nobody reads it; /metrics counts it as 499."""
    log.info("%s request dropped: the client disconnected (499)", what)
    return JSONResponse({}, status_code=499)


def _serve_error(err: ServeError) -> ApiError:
    if isinstance(err, QueueFull):
        return ApiError(429, str(err), err.code, headers={"Retry-After": "1"})
    if isinstance(err, UnknownModel):
        return ApiError(404, str(err), err.code, "model")
    return ApiError(getattr(err, "status", 400), str(err), getattr(err, "code", "invalid_request_error"))


def _need_key(state: ServerState) -> None:
    if not state.api_key:
        raise ApiError(403, "loading and unloading adapters is allowed only when the server has an "
                       "API key. Fix: start it with `bot serve --api-key KEY` (or BOT_API_KEY)",
                       "permission_denied")


def _params(body: ChatRequest, state: ServerState) -> tuple[SamplingParams, int | None]:
    """The request's sampling settings, checked, and the max_tokens it asked for (None: unset)."""
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    asked, name = body.max_tokens, "max_tokens"
    if body.max_completion_tokens is not None:
        asked, name = body.max_completion_tokens, "max_completion_tokens"
    if asked is not None and asked < 1:
        raise ApiError(400, f"{name} must be at least 1, got {asked}. Fix: leave it out to let "
                       "the reply use the rest of the context", param=name)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    cap = state.limits.max_stop_chars
    for s in stop:
        if len(s) > cap:
            raise ApiError(400, f"a stop string has {len(s):,} characters; at most {cap} are "
                           "allowed (streamed text is held back by the length of the longest "
                           "one). Fix: use a shorter stop string", param="stop")
    defaults = state.sampling_defaults
    params = SamplingParams(
        max_tokens=asked or 1,
        temperature=defaults["temperature"] if body.temperature is None else body.temperature,
        top_p=defaults["top_p"] if body.top_p is None else body.top_p,
        stop=stop, seed=body.seed,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty)
    try:
        params.check()
    except ValueError as err:
        raise ApiError(400, str(err), param=str(err).split(" ", 1)[0]) from err
    return params, asked


def _messages(body: ChatRequest, state: ServerState) -> list[dict]:
    """The conversation as {role, content} text, within the limits checked before tokenizing."""
    max_len = state.scheduler.max_len
    if len(body.messages) > max_len:
        raise ApiError(400, f"{len(body.messages):,} messages cannot fit the context limit of "
                       f"{max_len} tokens. Fix: send fewer messages", "context_length_exceeded",
                       "messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    chars = sum(len(m["role"]) + len(m["content"]) for m in messages)
    cap = state.limits.input_chars(max_len)
    if chars > cap:
        raise ApiError(400, f"the messages hold {chars:,} characters, over this server's limit of "
                       f"{cap:,} (bot serve --max-input-chars; a context of {max_len} tokens "
                       "cannot hold more). Fix: shorten the conversation", "context_length_exceeded",
                       "messages")
    if not messages[-1]["content"].strip():
        raise ApiError(400, "the last message is empty", param="messages")
    return messages


def _reply_budget(state: ServerState, prompt: int, asked: int | None) -> int:
    """max_tokens for the engine: as asked, or (vLLM's rule) the rest of the context."""
    limit = state.scheduler.max_len
    if asked is not None:
        if prompt + asked > limit:
            raise ApiError(400, f"this request needs {prompt} prompt tokens + max_tokens {asked} = "
                           f"{prompt + asked}, over the context limit of {limit} tokens. Fix: "
                           "shorten the messages or lower max_tokens", "context_length_exceeded",
                           "messages")
        return asked
    if prompt >= limit:
        raise ApiError(400, f"the prompt has {prompt} tokens, and the context limit of {limit} "
                       "tokens leaves no room for a reply. Fix: shorten the messages",
                       "context_length_exceeded", "messages")
    rest = limit - prompt
    return rest if state.default_max_tokens is None else min(rest, state.default_max_tokens)


async def _chat(state: ServerState, body: ChatRequest, request: Request, in_thread):
    params, asked = _params(body, state)
    messages = _messages(body, state)
    if body.model == "auto" and state.router is None:
        raise ApiError(404, "model 'auto' needs the router, which this server was started "
                       "without", "model_not_found", "model")
    try:  # routing, a classify adapter's answer and the chat template: off the event loop
        plan, ids = await in_thread(state.prepare_chat, body.model, messages)
    except ServeError as err:
        raise _serve_error(err) from err
    headers = {"x-bot-adapter": plan.adapter or state.base_name}
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    extra = plan.body()
    if plan.reply is not None:  # a classify adapter answers at once, as in the demo
        return _completion(cid, created, body.model, plan.reply, "stop", 0, 0, extra, headers,
                           body.stream)
    params.max_tokens = _reply_budget(state, len(ids), asked)
    events: asyncio.Queue[Event] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    try:
        req = state.scheduler.submit(ids, plan.adapter, params,
                                     lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    except ServeError as err:
        raise _serve_error(err) from err
    if body.stream:
        return StreamingResponse(_sse(req, events, cid, created, body.model, extra),
                                 media_type="text/event-stream", headers=headers)
    text, last = "", None
    try:
        while last is None:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                ev = None
            # checked at every token too: events keep coming while it decodes (issue 28)
            if await request.is_disconnected():
                req.cancel()  # the engine frees the row before its next step
                return _gone(state, "chat")
            if ev is not None:
                text += ev.delta
                last = ev if ev.finish_reason else None
    finally:
        req.cancel()
    if last.error:
        state.metrics.unexpected(request.url.path, "EngineError")
        raise ApiError(500, last.error, "internal_error")
    return _completion(cid, created, body.model, text, last.finish_reason, last.prompt_tokens,
                       last.completion_tokens, extra, headers, False)


def _completion(cid, created, model, text, reason, p_tokens, c_tokens, extra, headers, stream):
    if stream:
        async def once():
            yield _chunk(cid, created, model, {"role": "assistant", "content": text}, None, extra)
            yield _chunk(cid, created, model, {}, reason, None)
            yield "data: [DONE]\n\n"
        return StreamingResponse(once(), media_type="text/event-stream", headers=headers)
    body = {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": reason, "logprobs": None}],
            "usage": {"prompt_tokens": p_tokens, "completion_tokens": c_tokens,
                      "total_tokens": p_tokens + c_tokens}}
    body.update(extra)
    return JSONResponse(body, headers=headers)


def _chunk(cid, created, model, delta, reason, extra) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}
    if extra:
        body.update(extra)
    return f"data: {json.dumps(body)}\n\n"


async def _sse(req, events: asyncio.Queue, cid, created, model, extra):
    """Server-sent events; when the client goes away the request's row is freed at once."""
    try:
        yield _chunk(cid, created, model, {"role": "assistant", "content": ""}, None, extra)
        while True:
            ev = await events.get()
            if ev.error:
                err = {"error": {"message": ev.error, "type": "server_error", "code": "internal_error"}}
                yield f"data: {json.dumps(err)}\n\n"
                break
            if ev.delta:
                yield _chunk(cid, created, model, {"content": ev.delta}, None, None)
            if ev.finish_reason:
                usage = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                         "total_tokens": ev.prompt_tokens + ev.completion_tokens}
                final = json.loads(_chunk(cid, created, model, {}, ev.finish_reason, None)[6:])
                final["usage"] = usage
                yield f"data: {json.dumps(final)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        req.cancel()
