"""Which hosts and web pages may talk to lalo: the DNS-rebinding defence and CORS.

A web page can make the user's browser send requests to `127.0.0.1`: either to lalo's own
address (a cross-origin request: the browser sends `Origin`), or to a name of the attacker's
that it re-points at 127.0.0.1 after the page loaded (DNS rebinding: then the page is
"same-origin" and the browser sends `Host: attacker.example:PORT`). Ollama shipped this hole
(CVE-2024-28224) and closed it by checking `Host`. Here:

- While lalo listens on loopback (the default), a request whose `Host` is not one lalo serves
  is refused with 403 before anything else, on every route: `localhost` and `*.localhost`,
  loopback addresses (127.0.0.0/8, `[::1]`) and the names in `proxy.allowed_hosts`. On other
  addresses every name can be right (a LAN name, a pod address a Kubernetes probe sends) and
  API keys guard the port.
- A request with an `Origin` header (a browser's) is refused with 403 unless the origin's
  host is one of those names, or the origin is this very host (the dashboard), or it is listed
  in `proxy.cors_origins`. `Origin: null` (a sandboxed page, a local file) is refused.
- CORS is off unless `proxy.cors_origins` is set: only those origins get
  `Access-Control-Allow-Origin` (and answers to preflight `OPTIONS`), so only their pages can
  read lalo's answers. `"*"` lists every origin (the rest of these checks still apply).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from launcher.proxy.asgi import header
from launcher.proxy.errors import send_error

MAX_HEADER_BYTES = 64 * 1024  # all request headers together; larger gets 431
_CORS_METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"
_CORS_HEADERS = b"authorization, content-type, x-api-key"


def is_loopback(host: str) -> bool:
    """Whether an address lalo listens on is reachable only from this machine."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> str:
    """The name in a `Host` header or an origin's netloc, lower-case, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


class HostGuard:
    """ASGI middleware in front of everything else on the proxy port (see the module doc)."""

    def __init__(self, app: ASGIApp, *, listen_host: str, allowed_hosts: Iterable[str] = (),
                 cors_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.check_host = is_loopback(listen_host)
        self.names = {name.lower().rstrip(".") for name in allowed_hosts}
        self.cors = {origin.rstrip("/").lower() for origin in cors_origins}
        self.cors_any = "*" in self.cors

    def served(self, name: str) -> bool:
        """A host name this instance answers to (with any port)."""
        if is_loopback(name):
            return True
        if name in self.names:
            return True
        return any(pattern.startswith("*.") and name.endswith(pattern[1:]) for pattern in self.names)

    def _origin_allowed(self, origin: str, host: str | None) -> tuple[bool, bool]:
        """(may this origin's page send requests, may it read the answers: CORS)."""
        origin = origin.strip().rstrip("/").lower()
        cors = self.cors_any or origin in self.cors
        if origin == "null":  # only when listed by name: "*" does not cover it
            return "null" in self.cors, "null" in self.cors
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return cors, cors
        if self.served(split_host(parts.netloc)):
            return True, cors
        if host is not None and parts.netloc == host.lower():
            return True, cors  # the dashboard's own page, on whatever address lalo is reached
        return cors, cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host: str | None = None
        origin: str | None = None
        size = 0
        for key, value in scope["headers"]:
            size += len(key) + len(value)
            if key == b"host":
                host = value.decode("latin-1")
            elif key == b"origin":
                origin = value.decode("latin-1")
        if size > MAX_HEADER_BYTES:
            # httptools (uvicorn's parser here) sets no limit of its own
            await send_error(send, 431, f"request headers larger than {MAX_HEADER_BYTES} bytes")
            return
        if self.check_host and host is not None and not self.served(split_host(host)):
            await _forbid(send, f"host {host!r} is not served here (lalo listens on loopback; add "
                                "the name to proxy.allowed_hosts if it is yours)")
            return
        if origin is None:
            await self.app(scope, receive, send)
            return
        allowed, cors = self._origin_allowed(origin, host)
        if not allowed:
            await _forbid(send, f"requests from the web page at {origin!r} are not allowed "
                                "(list its origin in proxy.cors_origins if it should be)")
            return
        if not cors:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and header(scope, b"access-control-request-method"):
            await _preflight(send, origin)
            return
        await self.app(scope, receive, _with_cors(send, origin))


def _with_cors(send: Send, origin: str) -> Send:
    allow = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"origin")]

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *allow]}
        await send(message)

    return sending


async def _preflight(send: Send, origin: str) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-allow-methods", _CORS_METHODS),
        (b"access-control-allow-headers", _CORS_HEADERS),
        (b"access-control-max-age", b"600"),
        (b"vary", b"origin"),
        (b"content-length", b"0"),
    ]})
    await send({"type": "http.response.body", "body": b""})


async def _forbid(send: Send, message: str) -> None:
    await send_error(send, 403, message)
