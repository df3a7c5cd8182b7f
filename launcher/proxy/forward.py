"""Forward one request to a model's server and the answer back: streamed bytes pass as they arrive.

The lease on the model (its slot, its place in the queue) is held until the last byte is
sent or the client goes away; closing the upstream response then makes llama-server stop
generating at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import httpx
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from launcher.errors import CapacityError, ModelError, QueueFullError
from launcher.proxy.errors import error_response, sse_error_event
from launcher.proxy.metrics import ProxyMetrics
from launcher.supervisor.supervisor import Supervisor

log = logging.getLogger(__name__)

# Response headers that belong to one hop, not to the message.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
    "proxy-authenticate", "proxy-authorization", "content-length", "server", "date",
})
_TAIL_BYTES = 8192  # the end of a stream holds llama-server's timings / usage


class Forwarder:
    def __init__(self, supervisor: Supervisor, client: httpx.AsyncClient, metrics: ProxyMetrics,
                 upstream_timeout: float) -> None:
        self.supervisor = supervisor
        self.client = client
        self.metrics = metrics
        self.timeout = httpx.Timeout(connect=10.0, read=upstream_timeout, write=60.0, pool=60.0)

    async def forward(
        self,
        name: str,
        method: str,
        path: str,
        body: bytes,
        *,
        route: str,
        query: str = "",
        content_type: str = "application/json",
    ) -> Response:
        started = time.perf_counter()
        stack = contextlib.AsyncExitStack()
        try:
            endpoint = await stack.enter_async_context(self.supervisor.lease(name))
            headers = {"authorization": f"Bearer {endpoint.api_key}"}
            if body:
                headers["content-type"] = content_type
            request = self.client.build_request(
                method, endpoint.base_url + path + (f"?{query}" if query else ""),
                content=body, headers=headers, timeout=self.timeout,
            )
            upstream = await self.client.send(request, stream=True)
            stack.push_async_callback(upstream.aclose)
        except QueueFullError as exc:
            await stack.aclose()
            return self._error(name, route, started, 429, str(exc), headers={"Retry-After": "1"})
        except CapacityError as exc:
            await stack.aclose()
            return self._error(name, route, started, 503, str(exc), code="insufficient_memory")
        except ModelError as exc:
            await stack.aclose()
            return self._error(name, route, started, 503, str(exc))
        except httpx.TimeoutException:
            await stack.aclose()
            return self._error(name, route, started, 504,
                               f"{name}: no answer from the model server in time")
        except httpx.HTTPError as exc:
            await stack.aclose()
            return self._error(name, route, started, 502,
                               f"{name}: model server unreachable: {type(exc).__name__}")
        except BaseException:
            await stack.aclose()
            raise

        headers_out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            headers_out["cache-control"] = "no-cache"
            headers_out["x-accel-buffering"] = "no"
            state = _StreamState()

            async def finish() -> None:
                await stack.aclose()
                self._count(name, route, upstream.status_code, started)
                self._record_usage(name, _last_event(state.tail), started)

            return RelayResponse(
                self._relay(name, upstream, state, started), finish,
                status_code=upstream.status_code, headers=headers_out,
            )
        try:
            content = await upstream.aread()
        except httpx.TimeoutException:
            return self._error(name, route, started, 504,
                               f"{name}: the model server went silent for too long")
        except httpx.HTTPError as exc:
            return self._error(name, route, started, 502,
                               f"{name}: the model server broke off its answer: {type(exc).__name__}")
        finally:
            await stack.aclose()
        self._count(name, route, upstream.status_code, started)
        if upstream.status_code == 200 and route != "upstream":
            self._record_usage(name, content, started)
        return Response(content, status_code=upstream.status_code, headers=headers_out)

    async def _relay(
        self, name: str, upstream: httpx.Response, state: _StreamState, started: float,
    ) -> AsyncIterator[bytes]:
        first = True
        try:
            async for chunk in upstream.aiter_raw():
                if first:
                    self.metrics.ttft.labels(name).observe(time.perf_counter() - started)
                    first = False
                state.tail = (state.tail + chunk)[-_TAIL_BYTES:]
                yield chunk
        except httpx.TimeoutException:
            yield sse_error_event(504, f"{name}: the model server went silent for too long")
        except httpx.HTTPError as exc:
            yield sse_error_event(
                502, f"{name}: the model server broke off the stream ({type(exc).__name__})",
            )

    def _error(self, name: str, route: str, started: float, status: int, message: str,
               code: str | None = None, headers: dict[str, str] | None = None) -> Response:
        self._count(name, route, status, started)
        return error_response(status, message, code=code, headers=headers)

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


class _StreamState:
    __slots__ = ("tail",)

    def __init__(self) -> None:
        self.tail = b""


class RelayResponse(StreamingResponse):
    """A streamed answer whose cleanup always runs once it ends, however it ends.

    Starlette cancels the stream when the client disconnects; the cleanup (closing the
    upstream response, which stops generation, and releasing the model's slot) runs
    shielded from that cancellation.
    """

    def __init__(self, content: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None]],
                 *, status_code: int, headers: dict[str, str]) -> None:
        super().__init__(content, status_code=status_code, headers=headers)
        self._iterator = content
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self._iterator.aclose()  # type: ignore[attr-defined]
                await self._cleanup()


def _last_event(tail: bytes) -> bytes:
    """The JSON of the last `data:` event before `[DONE]` in the end of a stream."""
    for line in reversed(tail.splitlines()):
        line = line.strip()
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data and data != b"[DONE]":
                return data
    return b""
