"""A small keep-alive HTTP/1.1 client for the proxy's hot path: lalo to its own model servers.

Every streamed token crosses this code, on a machine whose cores the model server is using,
so it does as little as possible: an asyncio Protocol per connection, httptools' C parser
(which also undoes chunked encoding), and body bytes handed on as they arrive, coalesced
when several came at once. It speaks only to model servers on loopback; everything else
in lalo uses httpx. Peers (other lalos, launcher.proxy.peers) are reached the same way, over TLS
for an https peer.

A connection goes back to the pool only after a complete answer that allows keep-alive;
after an error, a cancel or an answer left unread it is closed (closing is also what makes
llama-server stop generating for a client that went away).

    UpstreamError            any failure (ConnectionError)
    ├── UpstreamUnavailable  could not connect (nobody listens: the server is gone)
    ├── UpstreamTimeout      the server went silent for longer than the read timeout
    ├── UpstreamBroken       the answer was not valid HTTP, or ended early
    │   └── UpstreamClosed   the server closed the connection before the answer was complete
    └── UpstreamBadTarget    the request target has bytes that cannot go into a request line
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from typing import cast

import httptools

_PAUSE_ABOVE = 1024**2  # bytes buffered for a slow client before we stop reading upstream
_NO_BODY_STATUS = frozenset({204, 304})


class UpstreamError(ConnectionError):
    pass


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamBroken(UpstreamError):
    pass


class UpstreamClosed(UpstreamBroken):
    pass


class UpstreamBadTarget(UpstreamError):
    pass


def check_target(target: str) -> None:
    """A request target must be visible ASCII: no space, CR, LF, NUL or other control bytes.

    Anything else would let a client's bytes end the request line early or add header lines
    to the request the model server reads. Percent-encoded forms (`%20`, `%0D%0A`) are fine.
    """
    if not target.startswith("/") or not all("!" <= char <= "~" for char in target):
        raise UpstreamBadTarget(
            f"the path {target!r} has characters that cannot be sent on (spaces, control "
            "characters or non-ASCII: percent-encode them)")


class _Connection(asyncio.Protocol):
    """One TCP connection and the answer being read on it (one request at a time)."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle = False
        self.idle_since = 0.0
        self.reset()

    def reset(self, head: bool = False) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head = head  # a HEAD request: the answer ends with its headers
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.until_close = False  # the body ends when the server closes the connection
        self.event_stream = False
        self.informational = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.received_any = False
        self.paused = False

    # --- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport has the Transport methods without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.idle or (self.complete and self.head):
            # bytes nobody asked for (on an idle connection, or after a HEAD answer): the
            # connection's framing is lost, never reuse it
            self.close()
            return
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"invalid HTTP from the model server: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.complete:
            return
        if self.until_close and exc is None and self.headers_done.done():
            self.complete = True  # the close is the end of this body
            self._wake()
            return
        self._fail(UpstreamClosed("the model server closed the connection"))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    # --- httptools callbacks --------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # `100 Continue` and friends: an interim answer, the real one follows
            self.informational = True
            self.headers = []
            return
        self.status = status
        if self.head or status in _NO_BODY_STATUS:
            self._complete()
        else:
            names = {name.lower(): value for name, value in self.headers}
            self.until_close = b"content-length" not in names and b"transfer-encoding" not in names
            # llama-server closes the connection after every event stream although its
            # headers say keep-alive: reusing one would always fail once first
            self.event_stream = names.get(b"content-type", b"").startswith(b"text/event-stream")
        if not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _PAUSE_ABOVE and self.transport is not None and not self.paused:
            self.transport.pause_reading()  # the client reads slower than the model writes
            self.paused = True
        self._wake()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self._complete()

    def _complete(self) -> None:
        if self.complete:
            return
        self.complete = True
        # asked now: the parser forgets it once it resets for the next message
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # --- for the response -----------------------------------------------------------------------
    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        if not self.headers_done.done():
            self.headers_done.set_exception(error)
            self.headers_done.exception()  # retrieved: it is re-raised from `request`
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def take_body(self) -> bytes:
        data = self.body.popleft() if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.transport.resume_reading()
            self.paused = False
        return data

    def reusable(self) -> bool:
        return (self.complete and self.keep_alive and not self.closed and self.error is None
                and not self.event_stream)


class UpstreamResponse:
    """Status, headers and the body of one answer; `aclose()` hands the connection back."""

    def __init__(self, connection: _Connection, read_timeout: float) -> None:
        self._connection = connection
        self._timeout = read_timeout
        self.status_code = connection.status
        self.headers = connection.headers
        self._closed = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (several small writes that came together, joined)."""
        connection = self._connection
        loop = asyncio.get_running_loop()
        while True:
            if connection.body:
                yield connection.take_body()
                continue
            if connection.complete:
                return
            if connection.error is not None:
                raise connection.error
            connection.waiter = loop.create_future()
            timer = loop.call_later(self._timeout, _expire, connection.waiter)
            try:
                await connection.waiter
            finally:
                timer.cancel()
                connection.waiter = None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def aclose(self) -> None:
        """Done with the answer: a fully read one frees the connection for reuse, else it closes."""
        if self._closed:
            return
        self._closed = True
        self._connection.pool.release(self._connection)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("the model server went silent for too long"))


class UpstreamPool:
    """Idle keep-alive connections per (host, port); one owner: the proxy app."""

    def __init__(self, keepalive_expiry: float = 4.0, max_idle_per_server: int = 64,
                 connect_timeout: float = 10.0) -> None:
        self.keepalive_expiry = keepalive_expiry
        self.max_idle = max_idle_per_server
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def request(
        self,
        method: str,
        host: str,
        port: int,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        read_timeout: float,
        tls: ssl.SSLContext | None = None,
    ) -> UpstreamResponse:
        """Send one request and wait for the answer's headers (`tls`: over TLS, checked so).

        Cancelled while waiting (the client went away), the connection is closed, never
        pooled: the server sees the close and stops working on the request.
        """
        check_target(target)
        head = [f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()]
        head += [name + b": " + value + b"\r\n" for name, value in headers]
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        payload = b"".join(head) + body
        is_head = method == "HEAD"
        for attempt in range(2):
            # the retry takes a new connection: the other idle ones may be as stale
            connection, reused = await self._connection(host, port, is_head, fresh=attempt > 0,
                                                        tls=tls)
            assert connection.transport is not None
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # the client left while the connection opened: send nothing, close, end here
                connection.close()
                raise asyncio.CancelledError
            connection.transport.write(payload)
            loop = asyncio.get_running_loop()
            timer = loop.call_later(read_timeout, _expire_headers, connection)
            try:
                await connection.headers_done
            except UpstreamClosed:
                connection.close()
                # an idle connection the server had just closed: safe to retry once, it
                # never read the request (no byte of an answer came back)
                if reused and attempt == 0 and not connection.received_any:
                    continue
                raise
            except BaseException:  # an error, or a cancel: the connection is not reusable
                connection.close()
                raise
            finally:
                timer.cancel()
            return UpstreamResponse(connection, read_timeout)
        raise AssertionError("unreachable")

    async def _connection(self, host: str, port: int, head: bool, fresh: bool = False,
                          tls: ssl.SSLContext | None = None) -> tuple[_Connection, bool]:
        key = (host, port)
        idle = None if fresh else self._idle.get(key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            connection.idle = False
            if not connection.closed and now - connection.idle_since < self.keepalive_expiry:
                connection.reset(head)
                return connection, True
            connection.close()
        loop = asyncio.get_running_loop()
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the connection and
            # drops a cancel that arrives in the step the connection opens (the client left)
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(self, key), host, port, ssl=tls,
                    server_hostname=host if tls is not None else None)
        except (OSError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"cannot connect to {host}:{port}: {exc}") from exc
        protocol.head = head
        return protocol, False

    def release(self, connection: _Connection) -> None:
        if connection.reusable() and len(self._idle.get(connection.key, ())) < self.max_idle:
            connection.idle = True
            connection.idle_since = time.monotonic()
            self._idle.setdefault(connection.key, []).append(connection)
        else:
            connection.close()  # unread, broken or cancelled: closing it stops the generation

    def idle_count(self, host: str, port: int) -> int:
        """Connections to that server waiting in the pool (for tests and metrics)."""
        return len(self._idle.get((host, port), ()))

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()


def _expire_headers(connection: _Connection) -> None:
    connection._fail(UpstreamTimeout("no answer from the model server in time"))
    connection.close()
