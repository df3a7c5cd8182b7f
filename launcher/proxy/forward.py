"""Forward one request to a model's server and the answer back, as raw ASGI: the proxy's hot path.

Streamed bytes pass on as they arrive. From the moment the request body is read, the client's
side is watched: a client that goes away while its request is queued, while its model loads,
while lalo waits for the answer's headers or while it reads a non-streamed answer cancels the
exchange at once. The lease (its slot, its place in the queue) is released and the upstream
connection closed, not pooled: the close makes llama-server stop generating. No framework sits
between the socket and this code: every token of every stream goes through it.

Three things a client does not see: a model server that died before lalo sent the client any
byte of its answer is asked once more after a new lease (the supervisor restarts it); a
streamed request that waits more than a moment for its model to load gets its response head
early and SSE comment lines while it waits, so clients and proxies in between do not time out;
and a non-streamed generation is asked of a llama-server lalo did not build as a stream and put
back together (`assemble.py`), because only a stream makes such a server stop when lalo closes
the connection (lalo's engine carries patch 0004, which makes the non-streamed request stop too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from starlette.types import Message, Receive, Send

from launcher.config.request_params import RequestRules
from launcher.errors import (
    CapacityError,
    ModelError,
    PeerDownError,
    QueueFullError,
    WaitTimeoutError,
)
from launcher.proxy.activity import Activity, usage_of
from launcher.proxy.assemble import AssemblyError, EventReader, Plan, assembler, plan
from launcher.proxy.errors import (
    error_message,
    explain_context_overflow,
    send_error,
    sse_error_event,
)
from launcher.proxy.metrics import ProxyMetrics
from launcher.proxy.params import Changes, apply_to_request
from launcher.proxy.peers import HOP_HEADER
from launcher.proxy.router import Router
from launcher.proxy.upstream import (
    UpstreamBadTarget,
    UpstreamClosed,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from launcher.supervisor.lease import Lease, LeaseRequest

log = logging.getLogger(__name__)

# Response headers that belong to one hop, not to the message.
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
    b"proxy-authenticate", b"proxy-authorization", b"content-length", b"server", b"date",
})
_STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
CLIENT_CLOSED = 499  # nginx's status for "the client closed the request", in metrics only


class _Failure(Exception):
    """An answer lalo makes itself (status, message), raised inside one exchange."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None,
                 broken: Lease | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers
        self.broken = broken  # the server broke off: its lease may say why it went


class _Retry(Exception):
    """The model server died before the client got a byte: lease again and ask once more."""

    def __init__(self, lease: Lease, cause: UpstreamError) -> None:
        super().__init__(str(cause))
        self.lease = lease
        self.cause = cause


class _Reply:
    """What has been sent to the client so far, and how to end it from here."""

    __slots__ = ("first_byte", "last", "lease", "params_changed", "previous", "relayed", "send",
                 "status", "streaming", "usage")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 502
        self.streaming = False  # the SSE response head went out (early, or from upstream)
        self.relayed = False  # a byte of upstream's body went out
        self.first_byte: float | None = None  # perf_counter when it did
        self.usage = b""
        self.previous = b""
        self.last = b""
        self.lease: Lease | None = None  # the last one the exchange held
        self.params_changed: Changes | None = None  # what the model's request rules changed

    async def start_stream(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.streaming = True
        self.status = status
        await self.send({"type": "http.response.start", "status": status,
                         "headers": headers + _STREAM_HEADERS})

    async def body(self, chunk: bytes) -> None:
        await self.send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def fail(self, failure: _Failure) -> None:
        self.status = failure.status  # for the metrics, also when the head said 200
        if self.streaming:
            await self.body(sse_error_event(failure.status, failure.message, failure.code))
            await self.end_stream()
            return
        await send_error(self.send, failure.status, failure.message, failure.code, failure.headers)

    async def end_stream(self) -> None:
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})


class Forwarder:
    """Sends requests to model servers over one pool of keep-alive connections."""

    def __init__(self, router: Router, pool: UpstreamPool, metrics: ProxyMetrics,
                 upstream_timeout: float, *, notice_after: float = 1.0,
                 notice_interval: float = 3.0, activity: Activity | None = None) -> None:
        self.router = router  # a model served here or by a peer: the same lease
        self.pool = pool
        self.metrics = metrics
        self.timeout = upstream_timeout
        self.notice_after = notice_after
        self.notice_interval = notice_interval
        self.activity = activity

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
        stream: bool = False,
        payload: dict[str, Any] | None = None,
    ) -> None:
        """Answer one request (its body already read) from `name`'s server.

        `stream`: the client asked for an event stream, so a long wait for the model may be
        filled with SSE comments. `payload`: `body` as JSON; a generation not streamed is asked
        as a stream of a server whose lease `assembles` (`assemble.plan`), and the event
        stream in answer is read whole and sent back as one JSON.
        """
        started = time.perf_counter()
        reply = _Reply(send)
        target = path + (f"?{query}" if query else "")
        exchange = asyncio.ensure_future(self._exchange(
            reply, name, method, target, body, content_type, stream, payload, started))
        gone = asyncio.ensure_future(_client_gone(receive))
        try:
            await asyncio.wait({exchange, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not exchange.done():
                # the client left: cancelling releases the lease or the queue place and
                # closes the upstream connection (llama-server stops generating)
                exchange.cancel()
                reply.status = CLIENT_CLOSED
            gone.cancel()
            await asyncio.gather(exchange, gone, return_exceptions=True)
        error = None if exchange.cancelled() else exchange.exception()
        if error is not None:
            raise error  # a bug: let the server log it and answer 500
        self._count(name, route, reply.status, started)
        # the answer's usage and timings, read once for the activity list and the model's speed
        counts = usage_of(reply.usage) if reply.status < 400 else (None, None, None)
        if self.activity is not None:
            self.activity.record(name, route, reply.status, started, reply.first_byte,
                                 reply.usage, body, counts=counts,
                                 params_changed=reply.params_changed)
        _, completion, rate = counts
        if reply.status == 200 and route != "upstream" and completion and reply.lease is not None:
            seconds = completion / rate if rate else time.perf_counter() - started
            reply.lease.record_tokens(completion, seconds)

    async def _exchange(self, reply: _Reply, name: str, method: str, target: str, body: bytes,
                        content_type: str, stream: bool, payload: dict[str, Any] | None,
                        started: float) -> None:
        dead: Lease | None = None
        for attempt in (1, 2):
            try:
                if dead is not None:
                    await dead.replaced()  # so that the next lease gets its successor
                await self._attempt(reply, name, method, target, body, content_type, stream,
                                    payload, started, retry_allowed=attempt == 1)
                return
            except _Retry as retry:
                log.warning("%s: the model server closed the connection before answering "
                            "(%s); asking once more", name, retry.cause)
                dead = retry.lease
            except _Failure as failure:
                if failure.broken is not None and (why := await failure.broken.replaced()):
                    failure.message += f" (the model server was {why})"
                await reply.fail(failure)
                return

    async def _attempt(self, reply: _Reply, name: str, method: str, target: str, body: bytes,
                       content_type: str, stream: bool, payload: dict[str, Any] | None,
                       started: float, *, retry_allowed: bool) -> None:
        async with contextlib.AsyncExitStack() as stack:
            lease = reply.lease = await self._lease(stack, reply, name, stream)
            endpoint = lease.endpoint
            if lease.request_rules:
                body, payload = self._apply_rules(reply, name, target, body, payload,
                                                  lease.request_rules)
            assemble = (plan(target.partition("?")[0], payload)
                        if payload is not None and lease.assembles else None)
            if assemble is not None:
                body = assemble.body
            headers = [(b"authorization", f"Bearer {endpoint.api_key}".encode())]
            if lease.via_peer:
                headers.append((HOP_HEADER, b"1"))
            if body:
                headers.append((b"content-type", content_type.encode()))
            try:
                upstream = await self.pool.request(
                    method, endpoint.host, endpoint.port, target, headers, body, self.timeout,
                    tls=lease.tls)
            except UpstreamBadTarget as exc:
                raise _Failure(400, str(exc)) from exc
            except UpstreamTimeout as exc:
                raise _Failure(504, f"{name}: no answer from the model server in time") from exc
            except (UpstreamUnavailable, UpstreamClosed) as exc:
                lease.unreachable(exc, at_once=isinstance(exc, UpstreamUnavailable))
                if retry_allowed:
                    raise _Retry(lease, exc) from exc
                if isinstance(exc, UpstreamUnavailable):
                    raise _Failure(502, f"{name}: model server unreachable: {exc}",
                                   broken=lease) from exc
                raise _Failure(502, f"{name}: model server broke off: {exc}",
                               broken=lease) from exc
            except UpstreamError as exc:
                raise _Failure(502, f"{name}: model server broke off: {exc}") from exc
            stack.push_async_callback(upstream.aclose)
            if not (upstream.header(b"content-type") or b"").startswith(b"text/event-stream"):
                await self._whole(reply, name, method, lease, upstream, retry_allowed)
            elif assemble is not None:
                await self._assembled(reply, name, lease, upstream, assemble, retry_allowed)
            else:
                await self._relay(reply, name, lease, upstream, started, retry_allowed)

    @staticmethod
    def _apply_rules(reply: _Reply, name: str, target: str, body: bytes,
                     payload: dict[str, Any] | None, rules: RequestRules
                     ) -> tuple[bytes, dict[str, Any] | None]:
        """lalo.yaml's request rules on the body (and the parsed payload the assembler reads)."""
        body, changed = apply_to_request(target.partition("?")[0], body, rules)
        if not changed:
            return body, payload
        log.debug("%s: request parameters set by lalo.yaml: %s", name, changed)
        reply.params_changed = changed
        return body, (json.loads(body) if payload is not None else None)

    async def _lease(self, stack: contextlib.AsyncExitStack, reply: _Reply, name: str,
                     stream: bool) -> Lease:
        """A slot on `name`'s server (here or a peer's); a streamed request that waits long
        hears about it."""
        try:
            request = self.router.lease(name)
        except PeerDownError as exc:
            raise _Failure(503, str(exc), code="peer_unavailable",
                           headers=[(b"retry-after", str(exc.retry_after).encode())]) from exc
        # a timer, not a task, on the fast path: the notices start only after a real wait
        notices: list[asyncio.Task[None]] = []
        timer = asyncio.get_running_loop().call_later(
            self.notice_after, lambda: notices.append(asyncio.ensure_future(
                self._notices(reply, name, request)))) if stream else None
        try:
            return await stack.enter_async_context(request)
        except QueueFullError as exc:
            raise _Failure(429, str(exc), headers=[(b"retry-after", b"1")]) from exc
        except CapacityError as exc:
            raise _Failure(503, str(exc), code="insufficient_memory") from exc
        except WaitTimeoutError as exc:
            retry = str(max(1, round(exc.retry_after))).encode()
            raise _Failure(503, str(exc), headers=[(b"retry-after", retry)]) from exc
        except ModelError as exc:
            raise _Failure(503, str(exc)) from exc
        finally:
            if timer is not None:
                timer.cancel()
            for task in notices:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _notices(self, reply: _Reply, name: str, request: LeaseRequest) -> None:
        """The SSE head (unless it went out already), then a comment every few seconds."""
        if not reply.streaming:
            await reply.start_stream(200, [(b"content-type", b"text/event-stream")])
        while True:
            await reply.body(f": {request.waiting_for()} {name}\n\n".encode())
            await asyncio.sleep(self.notice_interval)

    async def _relay(self, reply: _Reply, name: str, lease: Lease,
                     upstream: UpstreamResponse, started: float, retry_allowed: bool) -> None:
        """Stream upstream's bytes to the client as they come; an error ends it with an event."""
        if not reply.streaming:
            headers = [(k, v) for k, v in upstream.headers if k.lower() not in _HOP_BY_HOP]
            await reply.start_stream(upstream.status_code, headers)
        else:
            reply.status = upstream.status_code
        try:
            async for chunk in upstream.chunks():
                if not reply.relayed:
                    reply.first_byte = time.perf_counter()
                    self.metrics.ttft.labels(name).observe(reply.first_byte - started)
                    reply.relayed = True
                # the usage / timings event comes last: keep the last two chunks, copy nothing
                reply.previous, reply.last = reply.last, chunk
                await reply.body(chunk)
        except UpstreamTimeout:
            await reply.body(sse_error_event(504, f"{name}: the model server went silent for too long"))
        except UpstreamClosed as exc:
            if not reply.relayed and retry_allowed:
                raise _Retry(lease, exc) from exc
            why = await lease.replaced()
            await reply.body(sse_error_event(
                502, f"{name}: the model server broke off the stream "
                     + (f"(it was {why})" if why else f"({exc})")))
        except UpstreamError as exc:
            await reply.body(sse_error_event(
                502, f"{name}: the model server broke off the stream ({exc})"))
        reply.usage = _last_event(reply.previous + reply.last)
        await reply.end_stream()

    async def _whole(self, reply: _Reply, name: str, method: str, lease: Lease,
                     upstream: UpstreamResponse, retry_allowed: bool) -> None:
        """A non-streamed answer: read whole, then sent with its length."""
        with _reading_whole(name, lease, retry_allowed):
            content = await upstream.read()
        status = upstream.status_code
        if status == 400:
            content = explain_context_overflow(content, name)
        if reply.streaming:
            # the event stream's head already went out while the model loaded: an answer
            # that is not a stream (an error, mostly) becomes one event
            reply.status = status
            if status >= 400:
                raise _Failure(status, _upstream_message(content, status))
            await reply.body(b"data: " + content.strip() + b"\n\n")
            await reply.end_stream()
            reply.usage = content
            return
        headers = [(k, v) for k, v in upstream.headers if k.lower() not in _HOP_BY_HOP]
        if method == "HEAD":  # no body, but the length the body would have
            length = upstream.header(b"content-length")
            if length is not None:
                headers.append((b"content-length", length))
        else:
            headers.append((b"content-length", str(len(content)).encode()))
        reply.status = status
        await reply.send({"type": "http.response.start", "status": status, "headers": headers})
        await reply.send({"type": "http.response.body", "body": content})
        reply.usage = content

    async def _assembled(self, reply: _Reply, name: str, lease: Lease,
                         upstream: UpstreamResponse, plan: Plan, retry_allowed: bool) -> None:
        """The stream asked for a non-streamed request, read whole and answered as one JSON.

        Nothing reaches the client before the end, so a server that dies on the way is asked
        once more, as for any non-streamed answer.
        """
        events = EventReader()
        answer = assembler(plan)
        with _reading_whole(name, lease, retry_allowed):
            try:
                async for chunk in upstream.chunks():
                    for event, data in events.feed(chunk):
                        answer.feed(event, data)
                result = answer.answer()
            except AssemblyError as exc:
                raise _Failure(502, f"{name}: {exc}") from exc
        content = result.encode()
        headers = [(k, v) for k, v in upstream.headers
                   if k.lower() not in _HOP_BY_HOP and k.lower() != b"content-type"]
        headers += [(b"content-type", b"application/json; charset=utf-8"),
                    (b"content-length", str(len(content)).encode())]
        reply.status = result.status
        await reply.send({"type": "http.response.start", "status": result.status,
                          "headers": headers})
        await reply.send({"type": "http.response.body", "body": content})
        reply.usage = content

    def _count(self, name: str, route: str, status: int, started: float) -> None:
        self.metrics.requests.labels(name, route, str(status)).inc()
        self.metrics.latency.labels(name).observe(time.perf_counter() - started)


@contextlib.contextmanager
def _reading_whole(name: str, lease: Lease, retry_allowed: bool) -> Iterator[None]:
    """Upstream errors while an answer is read whole, before the client got any of it: a
    server that closed is asked once more (`_Retry`), anything else is lalo's own answer."""
    try:
        yield
    except UpstreamTimeout as exc:
        raise _Failure(504, f"{name}: the model server went silent for too long") from exc
    except UpstreamClosed as exc:
        if retry_allowed:
            raise _Retry(lease, exc) from exc
        raise _Failure(502, f"{name}: the model server broke off its answer: {exc}",
                       broken=lease) from exc
    except UpstreamError as exc:
        raise _Failure(502, f"{name}: the model server broke off its answer: {exc}") from exc


async def _client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (the request body was already read).

    ASGI servers also answer `http.disconnect` once the response is complete; by then the
    exchange is done and this is only cancelled.
    """
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


def _upstream_message(content: bytes, status: int) -> str:
    message = error_message(content)[:500]
    return message if content.strip() else f"the model server answered {status}"


def _last_event(tail: bytes) -> bytes:
    """The JSON of the last `data:` event before `[DONE]` in the end of a stream."""
    for line in reversed(tail.splitlines()):
        line = line.strip()
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data and data != b"[DONE]":
                return data
    return b""
