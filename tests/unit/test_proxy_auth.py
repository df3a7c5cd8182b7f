"""Who may call the proxy: keys, the admin token, open routes, cross-origin POSTs."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from launcher.proxy.auth import AuthMiddleware


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


async def test_cross_origin_posts_are_refused() -> None:
    application = app(())
    foreign = await call(application, "POST", "/v1/chat/completions", origin="https://evil.example")
    assert foreign.status_code == 403
    same = await call(application, "POST", "/v1/chat/completions", origin="http://127.0.0.1:8080")
    assert same.status_code == 200
    assert (await call(application, "POST", "/v1/chat/completions", origin="null")).status_code == 403
