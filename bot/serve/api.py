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
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..errors import BotError
from .sampling import SamplingParams
from .scheduler import Event, QueueFull, ServeError, UnknownModel
from .state import ServerState

log = logging.getLogger(__name__)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI's content parts: keep the text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
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
    seed: int | None = None
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
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 429: "rate_limit_error"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving ``state`` (backbone, adapters, router, scheduler)."""
    app = FastAPI(title="bot serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.bot = state

    @app.exception_handler(ApiError)
    async def _api_error(_req, err: ApiError):
        return _error(err.status, err.message, err.code, err.param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_req, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"invalid request body: {where or 'body'}: {first.get('msg', err)}",
                      "invalid_request_error", where or None)

    @app.exception_handler(HTTPException)
    async def _http(_req, err: HTTPException):
        return _error(err.status_code, str(err.detail), "not_found" if err.status_code == 404 else "error")

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        path = request.url.path
        if state.api_key and path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if given != f"Bearer {state.api_key}":
                state.metrics.request("-", path, 401)
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY' "
                              "(the key bot serve was started with)", "invalid_api_key")
        response = await call_next(request)
        if path.startswith("/v1/"):
            state.metrics.request(getattr(request.state, "model", "-"), path, response.status_code)
        return response

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
    async def chat(body: ChatRequest, request: Request):
        request.state.model = body.model
        return await _chat(state, body, request)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request):
        request.state.model = body.model
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ApiError(400, "input must be a non-empty string or list of non-empty strings",
                           param="input")
        if body.model not in state.scheduler.classifiers:
            raise ApiError(404, f"'{body.model}' is not a classify adapter; classify adapters: "
                           f"{sorted(state.scheduler.classifiers)}", "model_not_found", "model")
        task = state.scheduler.classifiers[body.model]
        texts = [_untemplated(task.spec.template, t) for t in texts]
        probs = await _in_thread(state.scheduler.classify, texts, [body.model] * len(texts))
        data = [{"index": i, "label": max(p, key=p.get), "probs": list(p.values()),
                 "label_probs": p, "num_classes": len(p)} for i, p in enumerate(probs)]
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": body.model, "labels": task.labels, "data": data,
                "usage": {"prompt_tokens": sum(len(state.tokenizer(t)["input_ids"]) for t in texts),
                          "total_tokens": 0}}

    @app.post("/v1/load_lora_adapter")
    async def load(body: LoadRequest, request: Request):
        request.state.model = body.lora_name
        _need_key(state)
        if not body.lora_path:
            raise ApiError(400, "lora_path is required: the adapter folder to load", param="lora_path")
        try:
            kind = await _in_thread(state.load_adapter, body.lora_name, Path(body.lora_path))
        except BotError as err:
            raise ApiError(400, str(err), param="lora_path") from err
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' ({kind}) added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: LoadRequest, request: Request):
        request.state.model = body.lora_name
        _need_key(state)
        if body.lora_name not in state.tasks and body.lora_name not in state.scheduler.generators:
            raise ApiError(404, f"no adapter named '{body.lora_name}' is loaded", "model_not_found",
                           "lora_name")
        await _in_thread(state.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def _untemplated(template: str, text: str) -> str:
    """Accept raw text or, as vLLM's /classify needs, text with the adapter's template applied.

    A client written for vLLM sends the template filled in; the same request to bot serve
    must not get the template twice.
    """
    head, _, tail = template.partition("{text}")
    if (head or tail) and text.startswith(head) and text.endswith(tail) \
            and len(text) >= len(head) + len(tail):
        return text[len(head):len(text) - len(tail)]
    return text


def _need_key(state: ServerState) -> None:
    if not state.api_key:
        raise ApiError(403, "loading and unloading adapters is allowed only when the server has an "
                       "API key. Fix: start it with `bot serve --api-key KEY` (or BOT_API_KEY)",
                       "permission_denied")


async def _in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _params(body: ChatRequest, state: ServerState) -> SamplingParams:
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    defaults = state.sampling_defaults
    params = SamplingParams(
        max_tokens=body.max_completion_tokens or body.max_tokens or state.default_max_tokens,
        temperature=defaults["temperature"] if body.temperature is None else body.temperature,
        top_p=defaults["top_p"] if body.top_p is None else body.top_p,
        stop=stop, seed=body.seed,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty)
    try:
        params.check()
    except ValueError as err:
        raise ApiError(400, str(err)) from err
    return params


async def _chat(state: ServerState, body: ChatRequest, request: Request):
    params = _params(body, state)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if not messages[-1]["content"].strip():
        raise ApiError(400, "the last message is empty", param="messages")
    if body.model == "auto" and state.router is None:
        raise ApiError(404, "model 'auto' needs the router, which this server was started "
                       "without", "model_not_found", "model")
    try:
        plan = await _in_thread(state.plan_chat, body.model, messages)
    except UnknownModel as err:
        raise ApiError(404, str(err), "model_not_found", "model") from err
    headers = {"x-bot-adapter": plan.adapter or state.base_name}
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    extra = plan.body()
    if plan.reply is not None:  # a classify adapter answers at once, as in the demo
        return _completion(cid, created, body.model, plan.reply, "stop", 0, 0, extra, headers,
                           body.stream)
    try:
        ids = state.prompt_ids(plan.adapter, messages)
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        req = state.scheduler.submit(ids, plan.adapter, params,
                                     lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    except QueueFull as err:
        raise ApiError(429, str(err), err.code, headers={"Retry-After": "1"}) from err
    except UnknownModel as err:
        raise ApiError(404, str(err), err.code, "model") from err
    except ServeError as err:
        raise ApiError(400, str(err), "context_length_exceeded", "messages") from err
    if body.stream:
        return StreamingResponse(_sse(req, events, cid, created, body.model, extra),
                                 media_type="text/event-stream", headers=headers)
    text, last = "", None
    try:
        while last is None:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    req.cancel()
                    return JSONResponse({}, status_code=499)
                continue
            text += ev.delta
            last = ev if ev.finish_reason else None
    finally:
        req.cancel()
    if last.error:
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
