"""launcher.client: OpenAI-shaped calls and lalo's error envelope mapped to typed exceptions."""

from __future__ import annotations

import json

import httpx
import pytest

from launcher import client as lalo


def transport(status: int, body: object, headers: dict[str, str] | None = None,
              stream: bytes | None = None) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if stream is not None:
            return httpx.Response(status, content=stream,
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(status, json=body, headers=headers or {})

    return httpx.MockTransport(handle)


def envelope(status: int, code: str) -> dict[str, object]:
    return {"error": {"message": f"failed with {status}", "type": "x", "code": code}}


@pytest.mark.parametrize(("status", "kind"), [
    (400, lalo.BadRequestError), (401, lalo.AuthenticationError), (404, lalo.ModelNotFoundError),
    (413, lalo.BadRequestError), (429, lalo.QueueFullError), (502, lalo.UpstreamError),
    (503, lalo.ModelUnavailableError), (504, lalo.UpstreamError),
])
async def test_errors_are_typed(status: int, kind: type[lalo.LaloAPIError]) -> None:
    async with lalo.LaloClient("http://lalo", transport=transport(
            status, envelope(status, "c"), {"retry-after": "2"})) as client:
        with pytest.raises(kind) as caught:
            await client.generate("hi", model="m")
    assert caught.value.status == status and caught.value.code == "c"
    assert caught.value.message == f"failed with {status}"
    if isinstance(caught.value, lalo.QueueFullError):
        assert caught.value.retry_after == 2.0


async def test_generate_and_stream() -> None:
    answer = {"choices": [{"message": {"role": "assistant", "content": "hello"}}]}
    async with lalo.LaloClient("http://lalo", transport=transport(200, answer)) as client:
        assert await client.generate("hi", model="m") == "hello"
    events = b"".join(
        b"data: " + json.dumps({"choices": [{"delta": {"content": piece}}]}).encode() + b"\n\n"
        for piece in ("a", "b", "c")
    ) + b"data: [DONE]\n\n"
    async with lalo.LaloClient("http://lalo", transport=transport(200, None, stream=events)) as client:
        assert [p async for p in client.stream_generate("hi", model="m")] == ["a", "b", "c"]


async def test_an_error_event_mid_stream_raises() -> None:
    events = (b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
              b'data: {"error":{"message":"broke","type":"upstream_error","code":"upstream_failed"}}\n\n')
    async with lalo.LaloClient("http://lalo", transport=transport(200, None, stream=events)) as client:
        pieces = []
        with pytest.raises(lalo.UpstreamError, match="broke"):
            async for piece in client.stream_generate("hi", model="m"):
                pieces.append(piece)
    assert pieces == ["a"]


async def test_unreachable_lalo_is_a_connection_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with lalo.LaloClient("http://lalo", transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(lalo.LaloConnectionError, match="not reachable"):
            await client.list_models()
