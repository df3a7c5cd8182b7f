"""Who may talk to the proxy: API keys (constant-time compare) and a cross-site request guard.

- With `api_keys`, every request but `GET /health` and the dashboard's static shell needs
  `Authorization: Bearer KEY` or `x-api-key: KEY`; the instance's admin token (state file)
  is accepted too.
- Without keys, `POST /api/shutdown` still needs the admin token.
- Which hosts and web pages may send requests at all (DNS rebinding, cross-origin pages, CORS)
  is decided before this, in `hosts.py`.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from launcher.proxy.errors import error_body

OPEN_PATHS = frozenset({"/health", "/", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)


class AuthMiddleware:
    def __init__(self, app: ASGIApp, api_keys: Iterable[str], admin_token: str) -> None:
        self.app = app
        self.keys = [key.encode() for key in api_keys]
        self.admin = admin_token.encode()

    def _valid(self, presented: bytes, allowed: Iterable[bytes]) -> bool:
        # compare against every key so timing does not reveal which one matched
        found = False
        for key in allowed:
            found |= hmac.compare_digest(presented, key)
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        path: str = scope["path"]
        headers = dict(scope["headers"])
        if method in ("GET", "HEAD") and (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)):
            await self.app(scope, receive, send)
            return
        presented = _bearer(headers)
        if path == "/api/shutdown":
            if presented is None or not self._valid(presented, [self.admin, *self.keys]):
                await _reject(send, 401, "shutting lalo down needs its admin token or an API key")
                return
        elif self.keys and (presented is None or not self._valid(presented, [*self.keys, self.admin])):
            await _reject(send, 401,
                          "missing or wrong API key (send Authorization: Bearer KEY or x-api-key: KEY)")
            return
        await self.app(scope, receive, send)


def _bearer(headers: dict[bytes, bytes]) -> bytes | None:
    """The key presented: `Authorization: Bearer KEY`, else `x-api-key: KEY` (Anthropic's SDK)."""
    value = headers.get(b"authorization")
    if value is not None:
        scheme, _, token = value.partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
    return headers.get(b"x-api-key", b"").strip() or None


async def _reject(send: Send, status: int, message: str) -> None:
    body = error_body(status, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="lalo"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
