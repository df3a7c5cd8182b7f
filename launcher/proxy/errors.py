"""The one JSON envelope for every error the proxy itself makes, so clients can tell them from upstream's."""

from __future__ import annotations

import json
from typing import Any, Final

from starlette.responses import Response
from starlette.types import Send

# status -> (type, code)
KINDS: Final[dict[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "model_not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    431: ("invalid_request_error", "headers_too_large"),
    429: ("rate_limit_error", "queue_full"),
    500: ("server_error", "internal_error"),
    502: ("upstream_error", "upstream_failed"),
    503: ("unavailable_error", "model_unavailable"),
    504: ("timeout_error", "upstream_timeout"),
}


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    kind, default_code = KINDS.get(status, ("server_error", "error"))
    return json.dumps(
        {"error": {"message": message, "type": kind, "code": code or default_code}}
    ).encode()


def error_response(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        error_body(status, message, code), status_code=status,
        media_type="application/json", headers=headers,
    )


async def send_error(send: Send, status: int, message: str, code: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """The error answer on a raw ASGI `send`: the envelope plus `headers` (an Allow, a
    WWW-Authenticate), for the middlewares and routes that run below Starlette."""
    body = error_body(status, message, code)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]})
    await send({"type": "http.response.body", "body": body})


def sse_error_event(status: int, message: str, code: str | None = None) -> bytes:
    """An error inside an event stream: what a client sees when upstream breaks mid-stream."""
    return b"data: " + error_body(status, message, code) + b"\n\n"


def error_message(body: bytes) -> str:
    """The human message of an error body: lalo's envelope, llama-server's, or the raw text."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip() or "error"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(data.get("message"), str):
            return str(data["message"])
    return body.decode("utf-8", "replace").strip() or "error"


def explain_context_overflow(body: bytes, model: str) -> bytes:
    """llama-server's 400 for a prompt longer than a slot's context (`exceed_context_size_error`,
    with both counts), its message saying what a lalo user can change; any other body as it is."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        return body
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or error.get("type") != "exceed_context_size_error":
        return body
    prompt, context = error.get("n_prompt_tokens"), error.get("n_ctx")
    error["message"] = (
        f"request ({prompt} tokens) exceeds the context of model {model} ({context} tokens): "
        f"shorten it, or raise models.{model}.ctx_size in lalo.yaml (`ctx_size: auto` takes the "
        "most that fits; with `parallel: N` a request gets ctx_size / N)")
    return json.dumps(data).encode()
