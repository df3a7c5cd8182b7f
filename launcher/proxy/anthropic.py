"""Errors on the Anthropic Messages routes in the shape Anthropic's clients parse.

`{"type": "error", "error": {"type": ..., "message": ...}}`, with the status kept: the
official SDKs pick their exception class from the status (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, 5xx InternalServerError) and show
`error.message`. Both the proxy's own errors and llama-server's are rewritten. In a stream,
the error event lalo sends when the model server breaks off becomes Anthropic's
`event: error` (the SDK raises on it; a nameless event it would skip); every other chunk
passes untouched at the cost of one prefix comparison.
"""

from __future__ import annotations

import json
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from launcher.proxy.errors import error_message

ANTHROPIC_PREFIX: Final = "/v1/messages"
_LALO_STREAM_ERROR: Final = b'data: {"error": {'  # what sse_error_event writes

# status -> Anthropic error type (docs.anthropic.com, "HTTP errors")
ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error(status: int, message: str) -> bytes:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


class AnthropicErrors:
    """ASGI middleware: error answers under /v1/messages rewritten to Anthropic's shape."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(ANTHROPIC_PREFIX):
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, _ErrorRewriter(send))


class _ErrorRewriter:
    """A `send` that holds back an error answer until its body is complete, then rewrites it."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._start: Message | None = None
        self._body: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            if message["status"] >= 400:
                self._start = message
                return
        elif message["type"] == "http.response.body" and self._start is None:
            chunk = message.get("body", b"")
            if chunk.startswith(_LALO_STREAM_ERROR):
                message = {**message, "body": _stream_error(chunk)}
        elif message["type"] == "http.response.body" and self._start is not None:
            self._body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            status = self._start["status"]
            body = anthropic_error(status, error_message(b"".join(self._body)))
            headers = [(k, v) for k, v in self._start.get("headers", [])
                       if k.lower() not in (b"content-length", b"content-type")]
            headers += [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]
            await self._send({"type": "http.response.start", "status": status, "headers": headers})
            await self._send({"type": "http.response.body", "body": body})
            return
        await self._send(message)


def _stream_error(event: bytes) -> bytes:
    """lalo's `data: {"error": {...}}` event as Anthropic's `event: error`."""
    payload = event[len(b"data:"):]
    try:
        error = json.loads(payload)["error"]
        status = 504 if error["code"] == "upstream_timeout" else 502
    except (ValueError, KeyError, TypeError):
        return event
    return b"event: error\ndata: " + anthropic_error(status, error_message(payload)) + b"\n\n"
