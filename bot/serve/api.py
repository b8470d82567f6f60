"""OpenAI-compatible HTTP API over the scheduler (``bot serve``).

Request and response shapes follow OpenAI's chat completions API, and the adapter
endpoints follow vLLM's (``/v1/load_lora_adapter``, ``/v1/classify``), so a client
written against ``bot serve`` moves to vLLM by changing only its base URL.
``model`` is an adapter name, the base model's name, or ``auto`` (the router picks).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.exceptions import HTTPException

from bot.engine import SamplingParams
from bot.engine.sampling import MAX_LOGPROBS
from bot.errors import ApiError, BotError, ServeError
from bot.serve.embeddings import embed
from bot.serve.limits import Guard, error_type
from bot.serve.openapi import document
from bot.serve.replies import (
    DISCONNECT_POLL_S,
    Job,
    Shape,
    generate,
    gone,
    ready_reply,
    serve_error,
)
from bot.serve.state import ServerState, _shown, _untemplated, adapter_name  # noqa: F401 (tests import it from here)
from bot.serve.structured import Structured, grammar_for

log = logging.getLogger(__name__)

# torch.Generator.manual_seed takes any 64-bit value, signed or not
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Any = None
    name: str | None = None  # OpenAI's participant name: accepted, not shown to the model

    @field_validator("content")
    @classmethod
    def _content(cls, value):
        """A string, null, or OpenAI's content parts, all of type text (this model reads text)."""
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(f"content must be a string or a list of content parts, got "
                             f"{type(value).__name__}")
        for i, part in enumerate(value):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValueError(f"content part {i} must be an object with a string 'type'")
            if part["type"] != "text":
                raise ValueError(f"content part {i} has type {part['type'][:40]!r}; this server "
                                 "reads text parts only. Fix: send the text")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} has type 'text' but its 'text' is "
                                 f"{type(part.get('text')).__name__}, not a string")
        return value

    @model_validator(mode="after")
    def _no_other_fields(self):
        """Fields OpenAI's own reply objects carry as null (refusal, tool_calls...) may come
        back with a conversation; set to anything else they are refused, never ignored."""
        for key, value in (self.model_extra or {}).items():
            if value not in (None, [], ""):
                raise ValueError(f"message field '{key[:40]}' is not supported here (only role, "
                                 "content and name). Fix: leave it out")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI's content parts: keep the text ones
            return "".join(p["text"] for p in self.content if p["type"] == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = True  # the last chunk always carries usage here


def _doc(**keywords) -> dict:
    """JSON Schema keywords for /openapi.json only: the handler checks them, with its own message."""
    return {"json_schema_extra": keywords}


class Sampling(Structured):
    """Fields /v1/chat/completions and /v1/completions share (OpenAI's names, vLLM's extras).

    Any other field is refused with a 400 naming it (``extra="forbid"``): never ignored.
    """

    model_config = ConfigDict(extra="forbid")
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, **_doc(minimum=1))
    temperature: float | None = Field(None, **_doc(minimum=0, maximum=2))
    top_p: float | None = Field(None, **_doc(exclusiveMinimum=0, maximum=1))
    stop: str | list[str] | None = Field(None, **_doc(maxItems=4, maxLength=128))
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int = Field(1, **_doc(enum=[1]))
    repetition_penalty: float | None = Field(None, **_doc(minimum=0.5, maximum=2))  # vLLM's
    # OpenAI fields accepted only at their neutral value (else a 400 naming them)
    presence_penalty: float | None = Field(None, **_doc(enum=[0, None]))
    frequency_penalty: float | None = Field(None, **_doc(enum=[0, None]))
    logit_bias: dict[str, float] | None = Field(None, **_doc(maxProperties=0))
    user: str | None = None  # OpenAI's end-user id: accepted, not used or logged


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, **_doc(minimum=1))
    logprobs: bool = False
    top_logprobs: int | None = Field(None, **_doc(minimum=0, maximum=MAX_LOGPROBS))


class CompletionRequest(Sampling):
    prompt: str | list[str]
    echo: bool = Field(False, **_doc(enum=[False]))
    logprobs: int | None = Field(None, **_doc(minimum=0, maximum=MAX_LOGPROBS))
    best_of: int | None = Field(None, **_doc(enum=[1, None]))
    suffix: str | None = Field(None, **_doc(enum=["", None]))

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value):
        """OpenAI also takes token ids; this server takes text only (one tokenizer, its own)."""
        if isinstance(value, list) and value and all(
                isinstance(v, int) or (isinstance(v, list) and v and isinstance(v[0], int))
                for v in value):
            raise ValueError("token-id prompts are not supported here. Fix: send the prompt "
                             "as a string (or a list of strings)")
        return value


# field -> the values it may take here (OpenAI's defaults): anything else is a 400 naming it
NEUTRAL = {"presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
           "echo": (False,), "best_of": (None, 1), "suffix": (None, "")}
WHY_NOT = {"presence_penalty": "use repetition_penalty (vLLM's) instead",
           "frequency_penalty": "use repetition_penalty (vLLM's) instead",
           "logit_bias": "leave it out", "echo": "prepend the prompt yourself",
           "best_of": "send the request several times with different seeds",
           "suffix": "leave it out (insertion is not supported)"}


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    input: str | list[str]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="only the model's own size is accepted")
    user: str | None = None  # OpenAI's end-user id: accepted, not used or logged


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str | None = None


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
    if first.get("type") == "extra_forbidden":
        where = _param(first.get("loc", ()))
        return ApiError(400, f"field '{_shown(where or '')}' is not supported by bot serve "
                        "(docs/api.md lists every field of every endpoint). Fix: leave it out",
                        "unsupported_field", where)
    if first.get("type") == "model_type":
        return ApiError(400, "the request body must be a JSON object", "invalid_request_error")
    where = _param(first.get("loc", ()))
    return ApiError(400, f"invalid request body: {where or 'body'}: {first.get('msg', '')}",
                    param=where)


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving ``state`` (backbone, adapters, router, scheduler)."""
    app = FastAPI(title="bot serve", docs_url=None, redoc_url=None, openapi_url=None)
    spec = document({
        "/v1/chat/completions": (ChatRequest, "chat reply (OpenAI)", True),
        "/v1/completions": (CompletionRequest, "text completion (OpenAI legacy)", True),
        "/v1/embeddings": (EmbeddingRequest, "embeddings (OpenAI)", False),
        "/v1/classify": (ClassifyRequest, "label probabilities (vLLM)", False),
        "/v1/load_lora_adapter": (LoadRequest, "load an adapter folder (vLLM)", False),
        "/v1/unload_lora_adapter": (LoadRequest, "unload an adapter (vLLM)", False),
    }, secured=bool(state.api_key))
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

    async def texts_body(request: Request, model: type[BaseModel], long_fix: str):
        """A body whose ``input`` holds texts (classify, embeddings), and its texts within limits."""
        body = await parse(request, model)
        request.state.model = body.model
        return body, _texts(state, body.input, "input", "send them in requests", long_fix)

    async def watched(request: Request, fn, *args):
        """``fn(*args, gone)`` in the pool while the client is watched: (None, None) once it left."""
        try:
            return await _watching(request, lambda gone: in_thread(fn, *args, gone))
        except ServeError as err:
            raise serve_error(err) from err

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
            message = f"no endpoint {req.url.path[:100]}; see docs/api.md for the endpoints"
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

    @app.get("/openapi.json")
    async def openapi():
        return spec

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": state.model_cards()}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await parse(request, ChatRequest)
        request.state.model = body.model
        return await _chat(state, body, request, in_thread)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        request.state.model = body.model
        return await _completions(state, body, request, in_thread)

    @app.post("/v1/classify")
    async def classify(request: Request):
        body, texts = await texts_body(request, ClassifyRequest,
                                       "shorten it (a classifier reads only its first tokens anyway)")
        if body.model not in state.scheduler.classifiers:
            raise ApiError(404, f"'{_shown(body.model)}' is not a classify adapter; classify "
                           f"adapters: {sorted(state.scheduler.classifiers)}", "model_not_found",
                           "model")
        task = state.scheduler.classifiers[body.model]
        probs, tokens = await watched(request, state.classify, body.model, texts)
        if probs is None:
            return gone("classify")
        data = [{"index": i, "label": max(p, key=p.get), "probs": list(p.values()),
                 "label_probs": p, "num_classes": len(p)} for i, p in enumerate(probs)]
        answer = {"id": f"classify-{uuid.uuid4().hex}", "object": "list",
                  "created": int(time.time()), "model": body.model, "labels": task.labels,
                  "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        # thousands of rows: encoded in the pool, not by FastAPI on the event loop
        return Response(await in_thread(_json_bytes, answer), media_type="application/json")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body, texts = await texts_body(request, EmbeddingRequest, "shorten it or split it")
        vectors, tokens = await watched(request, embed, state, body.model, texts)
        if vectors is None:
            return gone("embeddings")
        size = len(vectors[0])
        if body.dimensions is not None and body.dimensions != size:
            raise ApiError(400, f"dimensions={body.dimensions} is not supported: '{_shown(body.model)}' "
                           f"gives {size}-dimensional vectors and is not trained to be shortened. "
                           "Fix: leave dimensions out", "unsupported_field", "dimensions")
        answer = {"object": "list", "model": body.model,
                  "data": [{"object": "embedding", "index": i,
                            "embedding": _base64(v) if body.encoding_format == "base64" else v}
                           for i, v in enumerate(vectors)],
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
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


def _base64(vector: list[float]) -> str:
    """OpenAI's ``encoding_format: base64``: the float32 values, little-endian, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode()


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


def _need_key(state: ServerState) -> None:
    if not state.api_key:
        raise ApiError(403, "loading and unloading adapters is allowed only when the server has an "
                       "API key. Fix: start it with `bot serve --api-key KEY` (or BOT_API_KEY)",
                       "permission_denied")


def _params(body: Sampling, state: ServerState, logprobs: int | None = None
            ) -> tuple[SamplingParams, int | None]:
    """The request's sampling settings, checked, and the max_tokens it asked for (None: unset)."""
    if body.n != 1:
        raise ApiError(400, f"only n=1 is supported, got n={body.n}. Fix: send the request n "
                       "times (with different seeds when sampling)", param="n")
    for name, allowed in NEUTRAL.items():
        if name in body.model_fields_set and getattr(body, name, None) not in allowed:
            shown = " or ".join(json.dumps(v) for v in allowed)
            raise ApiError(400, f"{name} is not supported by bot serve (only {shown}). Fix: "
                           f"{WHY_NOT[name]}", "unsupported_field", name)
    asked, name = body.max_tokens, "max_tokens"
    if getattr(body, "max_completion_tokens", None) is not None:
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
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logprobs=logprobs)
    try:
        params.check()
    except ValueError as err:
        field = str(err).split(" ", 1)[0]
        if field == "logprobs" and isinstance(body, ChatRequest):
            field = "top_logprobs"
            err = ValueError(str(err).replace("logprobs", "top_logprobs", 1))
        raise ApiError(400, str(err), param=field) from err
    return params, asked


def _chat_logprobs(body: ChatRequest) -> int | None:
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


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


def _reply_budget(state: ServerState, prompt: int, asked: int | None, field: str) -> int:
    """max_tokens for the engine: as asked, or (vLLM's rule) the rest of the context."""
    limit = state.scheduler.max_len
    what = "the messages" if field == "messages" else "the prompt"
    if asked is not None:
        if prompt + asked > limit:
            raise ApiError(400, f"this request needs {prompt} prompt tokens + max_tokens {asked} = "
                           f"{prompt + asked}, over the context limit of {limit} tokens. Fix: "
                           f"shorten {what} or lower max_tokens", "context_length_exceeded",
                           field)
        return asked
    if prompt >= limit:
        raise ApiError(400, f"the prompt has {prompt} tokens, and the context limit of {limit} "
                       f"tokens leaves no room for a reply. Fix: shorten {what}",
                       "context_length_exceeded", field)
    rest = limit - prompt
    return rest if state.default_max_tokens is None else min(rest, state.default_max_tokens)


def _jobs(state: ServerState, prompts: list[list[int]], asked: int | None, field: str) -> list[Job]:
    """One engine job per prompt, each within the context limit (all checked before any runs)."""
    return [Job(ids, _reply_budget(state, len(ids), asked, field)) for ids in prompts]


async def _grammar(state: ServerState, body: Sampling, params: SamplingParams, in_thread) -> None:
    """Compile the request's structured-output grammar (if any) into ``params``, off the loop."""
    vocab = state.backbone.base.config.vocab_size  # the logits' width
    params.grammar = await in_thread(grammar_for, body, state.tokenizer, vocab)


async def _chat(state: ServerState, body: ChatRequest, request: Request, in_thread):
    params, asked = _params(body, state, _chat_logprobs(body))
    messages = _messages(body, state)
    await _grammar(state, body, params, in_thread)
    if body.model == "auto" and state.router is None:
        raise ApiError(404, "model 'auto' needs the router, which this server was started "
                       "without", "model_not_found", "model")
    try:  # routing, a classify adapter's answer and the chat template: off the event loop
        plan, ids = await in_thread(state.prepare_chat, body.model, messages)
    except ServeError as err:
        raise serve_error(err) from err
    headers = {"x-bot-adapter": plan.shown(state.base_name)}
    shape = Shape(True, body.model, state.tokenizer, plan.body())
    if plan.reply is not None:  # a classify adapter answers at once, as in the demo
        if params.grammar is not None:
            raise ApiError(400, f"'{plan.adapter}' is a classify adapter: its reply is a label, not "
                           "generated text, so it cannot follow response_format or guided_*. Fix: "
                           "name a generation model, or use /v1/classify", param="model")
        return ready_reply(shape, plan.reply, headers, body.stream)
    return await generate(state, request, _jobs(state, [ids], asked, "messages"), plan.adapter,
                          params, shape, headers, body.stream, "chat", in_thread)


async def _completions(state: ServerState, body: CompletionRequest, request: Request, in_thread):
    params, asked = _params(body, state, body.logprobs)
    if isinstance(body.prompt, list) and not body.prompt:
        raise ApiError(400, "prompt must be a non-empty string or list of non-empty strings",
                       param="prompt")
    prompts = _texts(state, body.prompt, "prompt", "send them in several requests",
                     "shorten it, or raise bot serve --max-input-chars")
    try:
        adapter = state.generation_adapter(body.model)
    except ServeError as err:
        raise serve_error(err) from err
    await _grammar(state, body, params, in_thread)
    prompt_ids = await in_thread(state.token_ids, prompts)
    shape = Shape(False, body.model, state.tokenizer, {"bot": {"adapter": adapter_name(adapter)}})
    headers = {"x-bot-adapter": adapter_name(adapter) or state.base_name}
    return await generate(state, request, _jobs(state, prompt_ids, asked, "prompt"), adapter,
                          params, shape, headers, body.stream, "completions", in_thread)


def _texts(state: ServerState, value: str | list[str], field: str, split_fix: str,
           long_fix: str) -> list[str]:
    """The texts of a request (one string or a list), within the per-request limits.

    The same caps for every endpoint that takes a list of texts (classify, embeddings,
    completions): at most ``--max-classify-inputs`` of them, none empty, and each within
    ``--max-input-chars``, all checked before anything is tokenized.
    """
    texts = [value] if isinstance(value, str) else list(value)
    cap = state.limits.max_classify_inputs
    if len(texts) > cap:
        raise ApiError(400, f"{field} has {len(texts):,} texts, over this server's limit of "
                       f"{cap:,} per request (bot serve --max-classify-inputs). Fix: {split_fix} "
                       f"of at most {cap:,}", "too_many_inputs", field)
    if not texts or any(not t.strip() for t in texts):
        raise ApiError(400, f"{field} must be a non-empty string or list of non-empty strings",
                       param=field)
    chars = state.limits.input_chars(state.scheduler.max_len)
    long = next((i for i, t in enumerate(texts) if len(t) > chars), None)
    if long is not None:
        raise ApiError(400, f"{field} text {long} has {len(texts[long]):,} characters, over this "
                       f"server's limit of {chars:,} (bot serve --max-input-chars). Fix: {long_fix}",
                       "input_too_long", field)
    return texts
