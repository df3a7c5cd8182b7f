"""Reading a raw ASGI request, for the middlewares and routes that run below Starlette: one
header, the whole body within a size limit."""

from __future__ import annotations

from starlette.types import Receive, Scope


class BodyTooLarge(Exception):
    pass


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of request header `name` (lower-case), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, or BodyTooLarge as soon as it passes `limit` bytes."""
    for key, value in scope["headers"]:
        if key == b"content-length" and value.isdigit() and int(value) > limit:
            raise BodyTooLarge
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
