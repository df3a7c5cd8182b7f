"""The supervisor's HTTP probe against real sockets: status codes, headers, and every way to fail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from launcher.supervisor.platform import free_port
from launcher.supervisor.probe import ProbeError, http_status

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_returns_the_status_and_sends_path_and_headers(serve) -> None:  # type: ignore[no-untyped-def]
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        status = b"503 Service Unavailable" if len(seen) == 1 else b"200 OK"
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    port = await serve(handler)
    url = f"http://127.0.0.1:{port}/health?x=1"
    assert await http_status(url, {"Authorization": "Bearer k"}, 2.0) == 503
    assert await http_status(url, {}, 2.0) == 200
    first = seen[0].decode()
    assert first.startswith("GET /health?x=1 HTTP/1.1\r\n")
    assert "\r\nAuthorization: Bearer k\r\n" in first
    assert f"\r\nHost: 127.0.0.1:{port}\r\n" in first


async def test_refused_connection_is_a_probe_error() -> None:
    with pytest.raises(ProbeError):
        await http_status(f"http://127.0.0.1:{free_port('127.0.0.1')}/health", {}, 2.0)


async def test_a_server_that_never_answers_times_out(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # holds the connection, answers nothing, until the probe gives up

    port = await serve(handler)
    started = asyncio.get_running_loop().time()
    with pytest.raises(ProbeError):
        await http_status(f"http://127.0.0.1:{port}/health", {}, 0.3)
    assert asyncio.get_running_loop().time() - started < 2


@pytest.mark.parametrize("answer", [b"", b"garbage\r\n", b"HTTP/1.1 abc\r\n"])
async def test_anything_but_a_status_line_is_a_probe_error(serve, answer: bytes) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    port = await serve(handler)
    with pytest.raises(ProbeError):
        await http_status(f"http://127.0.0.1:{port}/", {}, 2.0)


async def test_only_plain_http_urls() -> None:
    with pytest.raises(ProbeError, match="only http"):
        await http_status("https://127.0.0.1:1/health", {}, 1.0)
