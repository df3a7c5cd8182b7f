"""One small JSON request to a local model server (sleep polling, slot save and restore).

Plain HTTP/1.1 over asyncio streams, one connection per request, like `probe.py`: these
requests sit on a model's start path (slot restore before it is ready), where building a
general-purpose client costs more than the request itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

_MAX_BODY = 4 * 1024 * 1024


class LocalHttpError(Exception):
    """No complete HTTP answer in time (refused, reset, timed out, malformed)."""


@dataclass(frozen=True)
class JsonAnswer:
    status: int
    body: Any  # the decoded JSON, or None when the body is not JSON


async def request_json(method: str, url: str, headers: Mapping[str, str], within: float,
                       payload: Any = None) -> JsonAnswer:
    """`method url` with `payload` as a JSON body; the status and decoded body, within `within` s."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise LocalHttpError(f"cannot request {url!r}: only http://host[:port]/path")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    body = b"" if payload is None else json.dumps(payload).encode()
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close",
             f"Content-Length: {len(body)}"]
    if payload is not None:
        lines.append("Content-Type: application/json")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
            writer.write(request)
            await writer.drain()
            raw = b""
            while len(raw) <= _MAX_BODY:  # Connection: close, so the answer ends at EOF
                chunk = await reader.read(65536)
                if not chunk:
                    break
                raw += chunk
    except (OSError, TimeoutError) as exc:
        raise LocalHttpError(f"{method} {url}: {exc!r}") from exc
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return _parse(raw, f"{method} {url}")


def _parse(raw: bytes, what: str) -> JsonAnswer:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    fields = head.split(b"\r\n", 1)[0].split(None, 2)
    if not sep or len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        raise LocalHttpError(f"{what}: not an HTTP answer: {raw[:80]!r}")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
    }
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        rest = _dechunk(rest)
    elif (length := headers.get(b"content-length", b"")).isdigit():
        rest = rest[: int(length)]
    try:
        decoded: Any = json.loads(rest) if rest else None
    except ValueError:
        decoded = None
    return JsonAnswer(int(fields[1]), decoded)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)
