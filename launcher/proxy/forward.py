"""Forward one request to a model's server and the answer back, as raw ASGI: the proxy's hot path.

Streamed bytes pass on as they arrive. The lease on the model (its slot, its place in the
queue) is held until the last byte is sent or the client goes away; closing the upstream
response then makes llama-server stop generating at once. No framework sits between the
socket and this code: every token of every stream goes through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from starlette.types import Message, Receive, Send

from launcher.errors import CapacityError, ModelError, QueueFullError
from launcher.proxy.errors import error_body, sse_error_event
from launcher.proxy.metrics import ProxyMetrics
from launcher.proxy.upstream import (
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from launcher.supervisor.supervisor import Supervisor

log = logging.getLogger(__name__)

# Response headers that belong to one hop, not to the message.
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
    b"proxy-authenticate", b"proxy-authorization", b"content-length", b"server", b"date",
})
_STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


async def send_error(send: Send, status: int, message: str, code: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_body(status, message, code)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]})
    await send({"type": "http.response.body", "body": body})


class Forwarder:
    """Sends requests to model servers over one pool of keep-alive connections."""

    def __init__(self, supervisor: Supervisor, pool: UpstreamPool, metrics: ProxyMetrics,
                 upstream_timeout: float) -> None:
        self.supervisor = supervisor
        self.pool = pool
        self.metrics = metrics
        self.timeout = upstream_timeout

    async def forward(
        self,
        receive: Receive,
        send: Send,
        name: str,
        method: str,
        path: str,
        body: bytes,
        *,
        route: str,
        query: str = "",
        content_type: str = "application/json",
    ) -> None:
        started = time.perf_counter()
        status = 502
        usage = b""
        async with contextlib.AsyncExitStack() as stack:
            try:
                endpoint = await stack.enter_async_context(self.supervisor.lease(name))
                headers = [(b"authorization", f"Bearer {endpoint.api_key}".encode())]
                if body:
                    headers.append((b"content-type", content_type.encode()))
                upstream = await self.pool.request(
                    method, endpoint.host, endpoint.port, path + (f"?{query}" if query else ""),
                    headers, body, self.timeout)
                stack.push_async_callback(upstream.aclose)
            except QueueFullError as exc:
                status = 429
                await send_error(send, 429, str(exc), headers=[(b"retry-after", b"1")])
                return self._count(name, route, status, started)
            except CapacityError as exc:
                status = 503
                await send_error(send, 503, str(exc), code="insufficient_memory")
                return self._count(name, route, status, started)
            except ModelError as exc:
                status = 503
                await send_error(send, 503, str(exc))
                return self._count(name, route, status, started)
            except UpstreamTimeout:
                status = 504
                await send_error(send, 504, f"{name}: no answer from the model server in time")
                return self._count(name, route, status, started)
            except UpstreamUnavailable as exc:
                await send_error(send, 502, f"{name}: model server unreachable: {exc}")
                return self._count(name, route, status, started)
            except UpstreamError as exc:
                await send_error(send, 502, f"{name}: model server broke off: {exc}")
                return self._count(name, route, status, started)

            status = upstream.status_code
            headers_out = [(k, v) for k, v in upstream.headers if k.lower() not in _HOP_BY_HOP]
            if (upstream.header(b"content-type") or b"").startswith(b"text/event-stream"):
                await send({"type": "http.response.start", "status": status,
                            "headers": headers_out + _STREAM_HEADERS})
                usage = _last_event(await self._relay(name, upstream, receive, send, started))
            else:
                try:
                    content = await upstream.read()
                except UpstreamTimeout:
                    status = 504
                    await send_error(send, 504, f"{name}: the model server went silent for too long")
                    return self._count(name, route, status, started)
                except UpstreamError as exc:
                    status = 502
                    await send_error(send, 502, f"{name}: the model server broke off its answer: {exc}")
                    return self._count(name, route, status, started)
                headers_out.append((b"content-length", str(len(content)).encode()))
                await send({"type": "http.response.start", "status": status, "headers": headers_out})
                await send({"type": "http.response.body", "body": content})
                usage = content
        # after the lease is released and the upstream closed: bookkeeping only
        self._count(name, route, status, started)
        if status == 200 and route != "upstream":
            self._record_usage(name, usage, started)
        return None

    async def _relay(self, name: str, upstream: UpstreamResponse, receive: Receive, send: Send,
                     started: float) -> bytes:
        """Stream upstream's bytes to the client until either side ends; the last bytes seen."""
        state = _Stream()
        pump = asyncio.ensure_future(self._pump(name, upstream, send, started, state))
        gone = asyncio.ensure_future(_client_gone(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, gone):
                if not task.done():
                    task.cancel()
            await asyncio.gather(pump, gone, return_exceptions=True)
        if pump.done() and not pump.cancelled() and pump.exception() is None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        return state.previous + state.last

    async def _pump(self, name: str, upstream: UpstreamResponse, send: Send, started: float,
                    state: _Stream) -> None:
        first = True
        try:
            async for chunk in upstream.chunks():
                if first:
                    self.metrics.ttft.labels(name).observe(time.perf_counter() - started)
                    first = False
                # the usage / timings event comes last: keep the last two chunks, copy nothing
                state.previous, state.last = state.last, chunk
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamTimeout:
            await send({"type": "http.response.body", "more_body": True, "body": sse_error_event(
                504, f"{name}: the model server went silent for too long")})
        except UpstreamError as exc:
            await send({"type": "http.response.body", "more_body": True, "body": sse_error_event(
                502, f"{name}: the model server broke off the stream ({exc})")})

    def _count(self, name: str, route: str, status: int, started: float) -> None:
        self.metrics.requests.labels(name, route, str(status)).inc()
        self.metrics.latency.labels(name).observe(time.perf_counter() - started)

    def _record_usage(self, name: str, payload: bytes, started: float) -> None:
        """Tokens generated and speed, from the usage/timings llama-server reports."""
        if not payload:
            return
        try:
            data: Any = json.loads(payload)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        timings = data.get("timings")
        timings = timings if isinstance(timings, dict) else {}
        usage = data.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        tokens = timings.get("predicted_n") or usage.get("completion_tokens") or 0
        millis = timings.get("predicted_ms")
        seconds = millis / 1000 if isinstance(millis, int | float) and millis > 0 else (
            time.perf_counter() - started)
        if isinstance(tokens, int) and tokens > 0:
            self.supervisor.record_tokens(name, tokens, seconds)


class _Stream:
    __slots__ = ("last", "previous")

    def __init__(self) -> None:
        self.previous = b""
        self.last = b""


async def _client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (the request body was already read)."""
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


def _last_event(tail: bytes) -> bytes:
    """The JSON of the last `data:` event before `[DONE]` in the end of a stream."""
    for line in reversed(tail.splitlines()):
        line = line.strip()
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data and data != b"[DONE]":
                return data
    return b""
