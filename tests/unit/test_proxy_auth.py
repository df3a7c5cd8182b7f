"""Who may call the proxy: keys, the admin token, open routes, Host names, web pages, CORS."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from launcher.proxy.auth import AuthMiddleware
from launcher.proxy.hosts import HostGuard


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def app(keys: tuple[str, ...]) -> Starlette:
    routes = [Route(path, ok, methods=["GET", "POST"]) for path in
              ("/health", "/", "/v1/models", "/v1/chat/completions", "/api/shutdown",
               "/static/app.js")]
    application = Starlette(routes=routes)
    application.add_middleware(AuthMiddleware, api_keys=keys, admin_token="admin-secret")
    return application


async def call(application: Starlette, method: str, path: str, **headers: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
        return await client.request(method, path, headers=headers)


@pytest.mark.parametrize("path", ["/health", "/", "/static/app.js"])
async def test_open_routes_need_no_key(path: str) -> None:
    assert (await call(app(("k1",)), "GET", path)).status_code == 200


async def test_keys_are_required_when_configured() -> None:
    application = app(("k1", "k2"))
    missing = await call(application, "GET", "/v1/models")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"] == 'Bearer realm="lalo"'
    assert (await call(application, "GET", "/v1/models", authorization="Bearer nope")).status_code == 401
    assert (await call(application, "GET", "/v1/models", authorization="Basic k1")).status_code == 401
    assert (await call(application, "GET", "/v1/models", authorization="Bearer k2")).status_code == 200
    # the instance's admin token works everywhere (lalo status / down use it)
    assert (await call(application, "GET", "/v1/models",
                       authorization="Bearer admin-secret")).status_code == 200


async def test_without_keys_everything_but_shutdown_is_open() -> None:
    application = app(())
    assert (await call(application, "POST", "/v1/chat/completions")).status_code == 200
    assert (await call(application, "POST", "/api/shutdown")).status_code == 401
    assert (await call(application, "POST", "/api/shutdown",
                       authorization="Bearer admin-secret")).status_code == 200


# --- hosts and web pages (DNS rebinding, cross-origin pages, CORS) ------------------------------

def guarded(listen: str = "127.0.0.1", allowed: tuple[str, ...] = (),
            cors: tuple[str, ...] = ()) -> HostGuard:
    routes = [Route(path, ok, methods=["GET", "POST"]) for path in
              ("/health", "/", "/api/status", "/v1/chat/completions", "/api/models/m/unload")]
    return HostGuard(AuthMiddleware(Starlette(routes=routes), api_keys=(), admin_token="a"),
                     listen_host=listen, allowed_hosts=allowed, cors_origins=cors)


async def send(application: HostGuard, method: str, path: str, headers: dict[str, str],
               content: bytes = b"") -> httpx.Response:
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
        return await client.request(method, path, headers=headers, content=content)


async def test_a_rebound_host_name_is_refused_on_every_route() -> None:
    # The requests of issue 14 that a DNS-rebinding page made, all answered 200 before.
    application = guarded()
    attacker = {"host": "attacker.example:8080"}
    status = await send(application, "GET", "/api/status", attacker)
    assert status.status_code == 403
    assert status.json()["error"]["type"] == "permission_error"
    assert "attacker.example" in status.json()["error"]["message"]
    chat = await send(application, "POST", "/v1/chat/completions",
                      {**attacker, "content-type": "text/plain"}, b'{"model": "m"}')
    assert chat.status_code == 403
    unload = await send(application, "POST", "/api/models/m/unload",
                        {**attacker, "origin": "http://attacker.example:8080"})
    assert unload.status_code == 403
    for path in ("/health", "/"):
        assert (await send(application, "GET", path, attacker)).status_code == 403


@pytest.mark.parametrize("host", [
    "127.0.0.1:8080", "localhost:8080", "LOCALHOST", "app.localhost:8080", "127.8.9.1",
    "[::1]:8080", "lalo.internal:8080", "gpu.example.lan",
])
async def test_loopback_names_and_allowed_hosts_are_served(host: str) -> None:
    application = guarded(allowed=("lalo.internal", "*.example.lan"))
    assert (await send(application, "GET", "/api/status", {"host": host})).status_code == 200


@pytest.mark.parametrize("host", ["example.lan", "evil.lalo.internal", "127.0.0.1.evil.example",
                                  "192.168.1.5:8080", "0.0.0.0:8080"])
async def test_names_that_only_look_allowed_are_refused(host: str) -> None:
    application = guarded(allowed=("lalo.internal", "*.example.lan"))
    assert (await send(application, "GET", "/api/status", {"host": host})).status_code == 403


async def test_off_loopback_any_host_is_served() -> None:
    # a Kubernetes probe sends the pod's address; there, API keys guard the port
    application = guarded(listen="0.0.0.0")
    assert (await send(application, "GET", "/health", {"host": "10.1.2.3:8080"})).status_code == 200


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://attacker.example:8080",
                                    "file://", "chrome-extension://abc"])
async def test_pages_of_other_origins_are_refused(origin: str) -> None:
    application = guarded()
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/api/status"),
                         ("POST", "/api/models/m/unload")):
        response = await send(application, method, path, {"origin": origin})
        assert response.status_code == 403, (method, path)
        assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("origin", ["http://127.0.0.1:8080", "http://localhost:3000",
                                    "https://app.localhost"])
async def test_pages_of_local_origins_may_call_but_get_no_cors(origin: str) -> None:
    response = await send(guarded(), "POST", "/v1/chat/completions", {"origin": origin})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers  # CORS is off unless configured


async def test_the_dashboard_on_a_lan_address_is_same_origin() -> None:
    application = guarded(listen="0.0.0.0")
    lan = {"host": "192.168.1.5:8080"}
    assert (await send(application, "POST", "/api/models/m/unload",
                       {**lan, "origin": "http://192.168.1.5:8080"})).status_code == 200
    assert (await send(application, "POST", "/api/models/m/unload",
                       {**lan, "origin": "http://192.168.1.6:8080"})).status_code == 403


async def test_configured_cors_origins_get_preflight_and_headers() -> None:
    application = guarded(cors=("https://app.example",))
    preflight = await send(application, "OPTIONS", "/v1/chat/completions", {
        "origin": "https://app.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    post = await send(application, "POST", "/v1/chat/completions", {"origin": "https://app.example"})
    assert post.status_code == 200
    assert post.headers["access-control-allow-origin"] == "https://app.example"
    other = await send(application, "POST", "/v1/chat/completions", {"origin": "https://b.example"})
    assert other.status_code == 403
    # CORS never opens the Host check: a rebound name is still refused
    rebound = await send(application, "POST", "/v1/chat/completions",
                         {"origin": "https://app.example", "host": "app.example"})
    assert rebound.status_code == 403


async def test_oversized_headers_get_431_before_anything_else() -> None:
    # httptools sets no header limit: a 200 kB header reached the routes with 200 before
    application = guarded()
    big = await send(application, "GET", "/api/status", {"x-filler": "a" * 200_000})
    assert big.status_code == 431
    assert big.json()["error"]["code"] == "headers_too_large"
    fine = await send(application, "GET", "/api/status", {"x-filler": "a" * 8_000})
    assert fine.status_code == 200
