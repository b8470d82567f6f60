"""What one request may cost ``bot serve``, and the ASGI/HTTP layers that enforce it.

* :class:`Limits`: body size, characters, classify inputs, stop length and the header,
  body and keep-alive timeouts (``bot serve --max-body-bytes`` etc.; docs/serving.md).
* :class:`Guard`: a plain ASGI middleware (no BaseHTTPMiddleware, so streaming and
  ``request.is_disconnected()`` work unchanged underneath it) that checks the API key in
  constant time, reads each request body before the app sees it (413 past
  ``max_body_bytes``, 408 when it is not complete within ``body_timeout``), turns any
  unexpected exception into an OpenAI-shaped 500, and counts every request in
  ``/metrics`` (499 when the client left before its answer was complete).
* :class:`TimedH11Protocol`: uvicorn's h11 protocol plus a header timeout. uvicorn times
  out only idle keep-alive connections (``timeout_keep_alive``, after a response); a client
  that connects and sends half a request line is otherwise kept forever.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from bot.errors import ConfigError, RequestRefused

log = logging.getLogger(__name__)

# kinds of OpenAI's error shape by HTTP status (anything else 4xx: invalid_request_error)
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               429: "rate_limit_error"}


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


def error_body(status: int, message: str, code: str, param: str | None = None) -> bytes:
    """OpenAI's error object as JSON bytes."""
    return json.dumps({"error": {"message": message, "type": error_type(status), "param": param,
                                 "code": code}}).encode()


@dataclass
class Limits:
    """Per-request limits of ``bot serve`` (every one a ``bot serve`` flag).

    Args:
        max_body_bytes: request bodies above this are refused with 413 before they are read
            whole (``--max-body-bytes``).
        max_input_chars: characters of all messages of one chat request (and of each
            classify text), checked before tokenizing; None = 32 per token of the context
            limit (65,536 for 2,048 tokens: longer text cannot fit, since a SmolLM2 token is
            rarely more than 16 characters) (``--max-input-chars``).
        max_classify_inputs: texts per ``/v1/classify`` request (``--max-classify-inputs``).
        max_stop_chars: characters per ``stop`` string; the server holds back that many
            characters of streamed text, so a long one would delay every chunk.
        header_timeout: seconds a connection may take to send a complete request head
            (``--header-timeout``); 408 and closed after.
        body_timeout: seconds from the request head to the end of its body
            (``--body-timeout``); 408 and closed after.
        keep_alive_timeout: seconds an idle keep-alive connection stays open (uvicorn's
            ``timeout_keep_alive``).
    """

    max_body_bytes: int = 4 * 1024 * 1024
    max_input_chars: int | None = None
    max_classify_inputs: int = 256
    max_stop_chars: int = 128
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: int = 5

    def input_chars(self, max_len: int) -> int:
        return self.max_input_chars if self.max_input_chars is not None else 32 * max_len

    def check(self) -> None:
        """Raise ConfigError (a ValueError) naming the flag when a limit is not positive."""
        for name in ("max_body_bytes", "max_classify_inputs", "max_stop_chars", "header_timeout",
                     "body_timeout", "keep_alive_timeout"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value!r}")
        if self.max_input_chars is not None and self.max_input_chars < 1:
            raise ConfigError(f"--max-input-chars must be >= 1, got {self.max_input_chars!r}")

    def uvicorn_options(self) -> dict:
        """Keyword arguments for ``uvicorn.Config``/``uvicorn.run`` that apply these limits."""
        protocol = type("TimedH11Protocol", (TimedH11Protocol,),
                        {"header_timeout": self.header_timeout})
        return {"http": protocol, "timeout_keep_alive": self.keep_alive_timeout}


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol that closes a connection whose request head is late.

    The clock starts when the connection opens and again after each response; it stops
    once h11 has a complete request head (the body has its own timeout, in :class:`Guard`).
    """

    header_timeout: float = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        body = error_body(408, f"the request head did not arrive within {self.header_timeout:g} s "
                          "(bot serve --header-timeout)", "request_timeout")
        head = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n")
        self.transport.write(head + body)
        self.transport.close()


class Guard:
    """ASGI middleware: API key, body size and time, unexpected errors, request counting.

    Args:
        app: the ASGI app to guard.
        state: the ServerState (its ``api_key``, ``limits``, ``metrics`` and model names).
    """

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state
        path = scope.get("path", "")
        counted = path.startswith("/v1/")
        sent = {"status": None, "complete": False, "failed": False}

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["complete"] = True
            await send(message)

        async def refuse(status: int, message: str, code: str, close: bool = False):
            body = error_body(status, message, code)
            headers = [(b"content-type", b"application/json"),
                       (b"content-length", str(len(body)).encode())]
            if close:  # the rest of the body is not read: the connection cannot be reused
                headers.append((b"connection", b"close"))
            await send_tracked({"type": "http.response.start", "status": status, "headers": headers})
            await send_tracked({"type": "http.response.body", "body": body})

        try:
            if counted and state.api_key and not _key_ok(scope, state.api_key):
                await refuse(401, "missing or wrong API key: send 'Authorization: Bearer KEY' "
                             "(the key bot serve was started with)", "invalid_api_key")
                return
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                try:
                    body = await self._read_body(scope, receive)
                except RequestRefused as err:
                    await refuse(err.status, err.message, err.code, close=True)
                    return
                if body is None:  # the client left while sending
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_tracked)
        except Exception as err:  # noqa: BLE001 (the one place an unexpected error is answered)
            log.exception("unexpected error answering %s %s", scope.get("method"), path)
            state.metrics.unexpected(path, type(err).__name__)
            if sent["status"] is None:
                await refuse(500, f"internal error ({type(err).__name__}); the server log has the "
                             "details", "internal_error")
            sent["failed"] = True  # (headers already out: uvicorn closes the connection)
        finally:
            if counted:
                status = 500 if sent["failed"] else \
                    sent["status"] if sent["complete"] and sent["status"] else 499
                model = (scope.get("state") or {}).get("model", "-")
                state.metrics.request(model, path, status, known=state.known_labels())

    async def _read_body(self, scope, receive) -> bytes | None:
        limits = self.state.limits
        cap = limits.max_body_bytes
        too_big = (f"the request body is over this server's limit of {cap:,} bytes. Fix: send "
                   "less (fewer or shorter messages or texts), or start the server with a larger "
                   "--max-body-bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > cap:
            raise RequestRefused(413, too_big, "request_too_large")
        deadline = time.monotonic() + limits.body_timeout
        chunks, size = [], 0
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                raise RequestRefused(408, f"the request body did not arrive within {limits.body_timeout:g} "
                               "s (bot serve --body-timeout)", "request_timeout") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                raise RequestRefused(413, too_big, "request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _key_ok(scope, key: str) -> bool:
    given = dict(scope.get("headers") or []).get(b"authorization", b"")
    return hmac.compare_digest(given, f"Bearer {key}".encode())


def _replay(body: bytes, receive):
    """A ``receive`` that hands the app the body already read, then the real channel."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        if pending:
            return pending.pop()
        return await receive()

    return replay
