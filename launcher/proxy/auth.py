"""Who may talk to the proxy and do what: API keys with roles (constant-time compare).

- With `api_keys`, every request but `GET /health` and the dashboard's static shell needs
  `Authorization: Bearer KEY` or `x-api-key: KEY`; the instance's admin token (state file)
  is accepted too, as an admin.
- A key's role decides the routes: `inference` keys may use the model routes (OpenAI,
  Anthropic, Ollama, llama-server's own) and read what the dashboard shows (status, history,
  metrics); everything else (load, unload, restart, reload, activity, logs, the `/upstream`
  pass-through, shutdown) needs an `admin` key: 403. New routes are admin-only unless listed.
- Without keys, every client is an admin, but `POST /api/shutdown` still needs the admin token.
- Which hosts and web pages may send requests at all (DNS rebinding, cross-origin pages, CORS)
  is decided before this, in `hosts.py`.

The key's name (never the key) and the client's address are kept for the request in a
context variable that the activity log reads (`caller()`).
"""

from __future__ import annotations

import contextvars
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from launcher.config import ApiKey
from launcher.proxy.errors import send_error

OPEN_PATHS = frozenset({"/health", "/", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
# read-only views an inference key may see besides the model routes
INFERENCE_VIEWS = frozenset({
    ("GET", "/v1/models"), ("GET", "/api/status"), ("GET", "/api/history"), ("GET", "/metrics"),
})
ADMIN_TOKEN_NAME = "admin-token"
ANONYMOUS = "anonymous"  # no keys configured


@dataclass(frozen=True, slots=True)
class Caller:
    key_name: str
    client: str


_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("lalo_caller", default=None)


def caller() -> Caller | None:
    """Who sent the request being served (None outside a request)."""
    return _CALLER.get()


def needs_admin(method: str, path: str, model_paths: frozenset[str]) -> bool:
    """Whether the route takes an admin key (an inference key gets 403)."""
    if path in model_paths:
        return False
    return (method.upper() if method != "HEAD" else "GET", path) not in INFERENCE_VIEWS


class AuthMiddleware:
    def __init__(self, app: ASGIApp, api_keys: Iterable[ApiKey | str], admin_token: str,
                 model_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.keys = [_entry(key, index) for index, key in enumerate(api_keys, start=1)]
        self.encoded = [key.key.encode() for key in self.keys]
        self.admin = admin_token.encode()
        self.model_paths = frozenset(model_paths)

    def _match(self, presented: bytes, allowed: list[bytes]) -> int | None:
        # compare against every key so timing does not reveal which one matched
        found: int | None = None
        for index, key in enumerate(allowed):
            if hmac.compare_digest(presented, key) and found is None:
                found = index
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        path: str = scope["path"]
        client = scope.get("client")
        address = f"{client[0]}" if client else ""
        if method in ("GET", "HEAD") and (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)):
            await self.app(scope, receive, send)
            return
        presented = _bearer(dict(scope["headers"]))
        found = None if presented is None else self._match(presented, [*self.encoded, self.admin])
        is_token = found == len(self.encoded)
        if found is None and path == "/api/shutdown":
            await _reject(send, 401, "shutting lalo down needs its admin token or an admin "
                                     "API key")
            return
        if found is None and self.keys:
            await _reject(send, 401, "missing or wrong API key (send Authorization: "
                                     "Bearer KEY or x-api-key: KEY)")
            return
        if found is not None and not is_token and self.keys[found].role != "admin" \
                and needs_admin(method, path, self.model_paths):
            await _reject(send, 403, f"the key {self.keys[found].name!r} has the inference "
                                     f"role: {method} {path} needs an admin key")
            return
        if found is None:
            name = ANONYMOUS
        else:
            name = ADMIN_TOKEN_NAME if is_token else self.keys[found].name
        token = _CALLER.set(Caller(name, address))
        try:
            await self.app(scope, receive, send)
        finally:
            _CALLER.reset(token)


def _entry(key: ApiKey | str, index: int) -> ApiKey:
    return key if isinstance(key, ApiKey) else ApiKey(key=key, name=f"key{index}")


def _bearer(headers: dict[bytes, bytes]) -> bytes | None:
    """The key presented: `Authorization: Bearer KEY`, else `x-api-key: KEY` (Anthropic's SDK)."""
    value = headers.get(b"authorization")
    if value is not None:
        scheme, _, token = value.partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
    return headers.get(b"x-api-key", b"").strip() or None


async def _reject(send: Send, status: int, message: str) -> None:
    challenge = [(b"www-authenticate", b'Bearer realm="lalo"')] if status == 401 else []
    await send_error(send, status, message, headers=challenge)
