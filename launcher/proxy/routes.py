"""The model-bearing routes of the proxy port: which paths, where each request names its model.

Every llama-server route that runs a model is served here, routed by the request's `model`
(name or alias) with the same semantics as chat completions: the model is loaded on demand,
requests queue for its slots, streams pass through as they come, a client that goes away
cancels the generation, and errors use the proxy's envelope. The JSON body names the model,
except for `/v1/audio/transcriptions`, where it is a field of the multipart form.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import Receive, Scope, Send

from launcher.proxy.asgi import BodyTooLarge, header, read_body
from launcher.proxy.errors import send_error
from launcher.proxy.forward import Forwarder
from launcher.proxy.peers import HOP_HEADER
from launcher.proxy.router import Router


@dataclass(frozen=True)
class ModelRoute:
    """One route: its metrics label and where the request names the model."""

    label: str
    model_in: Literal["json", "form"] = "json"


_CHAT = ModelRoute("chat")
_COMPLETIONS = ModelRoute("completions")
_LEGACY_COMPLETION = ModelRoute("completion")
_EMBEDDINGS = ModelRoute("embeddings")
_LEGACY_EMBEDDING = ModelRoute("embedding")
_RESPONSES = ModelRoute("responses")
_RERANK = ModelRoute("rerank")
_INPUT_TOKENS = ModelRoute("input_tokens")
_TRANSCRIPTIONS = ModelRoute("transcriptions", model_in="form")

# path -> route; the paths are llama-server's own (tools/server/server.cpp), POST only
MODEL_ROUTES: Final[dict[str, ModelRoute]] = {
    "/v1/chat/completions": _CHAT,
    "/chat/completions": _CHAT,
    "/v1/completions": _COMPLETIONS,
    "/completion": _LEGACY_COMPLETION,
    "/completions": _LEGACY_COMPLETION,
    "/v1/embeddings": _EMBEDDINGS,
    "/embedding": _LEGACY_EMBEDDING,
    "/embeddings": _LEGACY_EMBEDDING,
    "/v1/messages": ModelRoute("messages"),
    "/v1/messages/count_tokens": ModelRoute("count_tokens"),
    "/v1/responses": _RESPONSES,
    "/responses": _RESPONSES,
    "/v1/responses/input_tokens": _INPUT_TOKENS,
    "/responses/input_tokens": _INPUT_TOKENS,
    "/v1/chat/completions/input_tokens": _INPUT_TOKENS,
    "/chat/completions/input_tokens": _INPUT_TOKENS,
    "/v1/rerank": _RERANK,
    "/v1/reranking": _RERANK,
    "/rerank": _RERANK,
    "/reranking": _RERANK,
    "/v1/audio/transcriptions": _TRANSCRIPTIONS,
    "/audio/transcriptions": _TRANSCRIPTIONS,
    "/infill": ModelRoute("infill"),
    "/tokenize": ModelRoute("tokenize"),
    "/detokenize": ModelRoute("detokenize"),
    "/apply-template": ModelRoute("apply_template"),
}

_FORM_FIELD_LIMIT = 1024  # bytes: a model name, not a file


class FormError(ValueError):
    """A multipart body that cannot be read."""


def form_field(body: bytes, content_type: bytes, field: str) -> str | None:
    """The text of form field `field` in a multipart/form-data `body`, or None if absent.

    A push parser over the body already in memory, fed 64 KiB at a time: file parts (the
    audio) are passed over, not kept, and parsing stops at the end of the wanted field.
    """
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise FormError(f"expected multipart/form-data, got {kind.decode('latin-1') or 'none'}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise FormError("multipart/form-data without a boundary")
    state: dict[str, bool] = {"in_field": False, "done": False}
    header_name: list[bytes] = []
    header_value: list[bytes] = []
    value: list[bytes] = []

    def on_part_begin() -> None:
        state["in_field"] = False

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.append(data[start:end])

    def on_header_end() -> None:
        name = b"".join(header_name).lower()
        text = b"".join(header_value)
        header_name.clear()
        header_value.clear()
        if name == b"content-disposition":
            _, options = parse_options_header(text)
            state["in_field"] = options.get(b"name") == field.encode()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["in_field"]:
            value.append(data[start:end])
            if sum(map(len, value)) > _FORM_FIELD_LIMIT:
                raise FormError(f"form field {field!r} is longer than {_FORM_FIELD_LIMIT} bytes")

    def on_part_end() -> None:
        if state["in_field"]:
            state["done"] = True
            state["in_field"] = False

    callbacks: dict[str, Callable[..., None]] = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    view = memoryview(body)
    step = 64 * 1024
    try:
        for offset in range(0, len(body), step):
            parser.write(bytes(view[offset:offset + step]))
            if state["done"]:
                break
    except FormError:
        raise
    except Exception as exc:  # python-multipart raises its own errors for broken bodies
        raise FormError(f"malformed multipart body: {exc}") from exc
    if not state["done"]:
        return None
    try:
        return b"".join(value).decode()
    except UnicodeDecodeError as exc:
        raise FormError(f"form field {field!r} is not UTF-8") from exc


class ModelRouter:
    """POST on any route of MODEL_ROUTES: find the model, forward. Raw ASGI: the hot path."""

    def __init__(self, router: Router, forwarder: Forwarder, max_body_size: int) -> None:
        self.router = router
        self.forwarder = forwarder
        self.max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        route = MODEL_ROUTES[path]
        if scope["method"] != "POST":
            return await send_error(send, 405, f"{scope['method']} is not allowed on {path} (POST it)",
                                    headers=[(b"allow", b"POST")])
        try:
            body = await read_body(scope, receive, self.max_body_size)
        except BodyTooLarge:
            return await send_error(send, 413, f"request body larger than {self.max_body_size} bytes")
        content_type = b"application/json"
        stream = False
        payload: dict[str, Any] | None = None
        if route.model_in == "form":
            content_type = header(scope, b"content-type") or b""
            try:
                requested = form_field(body, content_type, "model")
            except FormError as exc:
                return await send_error(send, 400, f"{path}: {exc}")
        else:
            try:
                payload = json.loads(body)
            except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
                return await send_error(send, 400, f"request body is not valid JSON: {exc}")
            if not isinstance(payload, dict):
                return await send_error(send, 400, "request body must be a JSON object")
            requested = payload.get("model")
            stream = payload.get("stream") is True
        if not isinstance(requested, str) or not requested:
            where = "form field 'model'" if route.model_in == "form" else "'model'"
            return await send_error(
                send, 400, f"missing {where}: name one of {self.router.known()}",
                code="model_required")
        name = self.router.resolve(requested, from_peer=header(scope, HOP_HEADER) is not None)
        if name is None:
            return await send_error(send, 404, f"unknown model {requested!r}; known: "
                                               f"{self.router.known()}")
        refused = self.router.refusal(name, route.label)
        if refused is not None:  # before the lease: nothing loads for it
            return await send_error(send, 400, refused, code="model_capability")
        await self.forwarder.forward(
            receive, send, name, "POST", path, body, route=route.label,
            query=scope.get("query_string", b"").decode("latin-1"),
            content_type=content_type.decode("latin-1"), stream=stream, payload=payload,
        )


def route_list(*others: Iterable[str]) -> str:
    """Every route of the port, for the 404 of an unknown one: model routes first."""
    seen = dict.fromkeys(MODEL_ROUTES)
    for group in others:
        seen.update(dict.fromkeys(group))
    return ", ".join(seen)
