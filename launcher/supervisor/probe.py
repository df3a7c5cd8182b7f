"""The HTTP GET behind readiness and health probes of local model servers.

While a model loads the supervisor asks its server every 20 ms whether it is ready, with
several servers loading at once on a machine that may have two cores. A connection, one
request line and the status line of the answer are all a probe needs, and costs a fraction
of a general-purpose client's request (and none of its import time on `lalo up`'s path).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import urlsplit


class ProbeError(Exception):
    """The server did not answer with an HTTP status line in time."""


Probe = Callable[[str, Mapping[str, str], float], Awaitable[int]]
"""(url, headers, seconds to answer within) -> HTTP status code; raises ProbeError."""


async def http_status(url: str, headers: Mapping[str, str], within: float) -> int:
    """GET `url` (plain http) and return the status code of the answer, within `within` seconds."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ProbeError(f"cannot probe {url!r}: only http://host[:port]/path")
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(parts.hostname, port)
            writer.write(request)
            status_line = await reader.readline()
    except (OSError, TimeoutError) as exc:
        raise ProbeError(f"{url}: {exc!r}") from exc
    finally:
        if writer is not None:
            writer.close()  # the rest of the answer is not needed
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    fields = status_line.split(None, 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        raise ProbeError(f"{url}: not an HTTP answer: {status_line[:80]!r}")
    return int(fields[1])
