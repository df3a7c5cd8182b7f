"""The ASGI app on the proxy port: OpenAI routes, pass-through, admin API, metrics, dashboard.

It runs in the same event loop as the supervisor and holds one pooled HTTP client for
every upstream (a new client per request costs tens of milliseconds).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from launcher import __version__
from launcher.errors import CapacityError, ModelError
from launcher.proxy.auth import AuthMiddleware
from launcher.proxy.errors import error_response
from launcher.proxy.forward import Forwarder, send_error
from launcher.proxy.metrics import ProxyMetrics
from launcher.proxy.upstream import UpstreamPool
from launcher.supervisor.logs import read_tail
from launcher.supervisor.supervisor import Supervisor

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard" / "static"
OPENAI_ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


@dataclass(frozen=True)
class ProxySettings:
    api_keys: tuple[str, ...] = ()
    admin_token: str = ""
    max_body_size: int = 16 * 1024**2
    upstream_timeout: float = 600.0


class BodyTooLarge(Exception):
    pass


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, or BodyTooLarge as soon as it passes `limit` bytes."""
    for key, value in scope["headers"]:
        if key == b"content-length" and value.isdigit() and int(value) > limit:
            raise BodyTooLarge
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def create_app(
    supervisor: Supervisor,
    settings: ProxySettings,
    pool: UpstreamPool,
    *,
    on_shutdown: Callable[[], None] = lambda: None,
    log_paths: dict[str, Path] | None = None,
    on_reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> ASGIApp:
    """The proxy app; `on_shutdown` is called by `POST /api/shutdown` (lalo down)."""
    metrics = ProxyMetrics(supervisor)
    forwarder = Forwarder(supervisor, pool, metrics, settings.upstream_timeout)
    started = time.time()
    log_paths = log_paths or {}
    too_large = f"request body larger than {settings.max_body_size} bytes"

    async def health(request: Request) -> Response:
        states = [str(m.state) for m in supervisor.models.values()]
        return JSONResponse({
            "status": "ok",
            "version": __version__,
            "models_ready": states.count("ready"),
            "models": len(states),
        })

    async def openai(scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/chat/completions etc.: raw ASGI, the hot path."""
        route = OPENAI_ROUTES[scope["path"]]
        try:
            body = await read_body(scope, receive, settings.max_body_size)
        except BodyTooLarge:
            return await send_error(send, 413, too_large)
        try:
            payload = json.loads(body)
        except ValueError as exc:
            return await send_error(send, 400, f"request body is not valid JSON: {exc}")
        if not isinstance(payload, dict):
            return await send_error(send, 400, "request body must be a JSON object")
        requested = payload.get("model")
        if not isinstance(requested, str) or not requested:
            return await send_error(send, 400, "missing 'model': name one of " + _known(supervisor),
                                    code="model_required")
        name = supervisor.resolve(requested)
        if name is None:
            return await send_error(
                send, 404, f"unknown model {requested!r}; known: {_known(supervisor)}")
        await forwarder.forward(receive, send, name, "POST", scope["path"], body, route=route)

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        """ANY /upstream/{model}/{path}: any other llama-server route of that model."""
        params = scope["path_params"]
        name = supervisor.resolve(params["model"])
        if name is None:
            return await send_error(
                send, 404, f"unknown model {params['model']!r}; known: {_known(supervisor)}")
        try:
            body = await read_body(scope, receive, settings.max_body_size)
        except BodyTooLarge:
            return await send_error(send, 413, too_large)
        headers = dict(scope["headers"])
        await forwarder.forward(
            receive, send, name, scope["method"], "/" + params["path"], body, route="upstream",
            query=scope.get("query_string", b"").decode("latin-1"),
            content_type=headers.get(b"content-type", b"application/json").decode("latin-1"),
        )

    async def list_models(request: Request) -> Response:
        data: list[dict[str, Any]] = []
        for name, model in supervisor.models.items():
            info = supervisor.info[name]
            entry = {"object": "model", "created": int(started), "owned_by": "lalo",
                     "state": str(model.state)}
            data.append({"id": name, **entry, "aliases": list(info.aliases)})
            data.extend({"id": alias, **entry, "parent": name} for alias in info.aliases)
        return JSONResponse({"object": "list", "data": data})

    async def status(request: Request) -> Response:
        memory = psutil.virtual_memory()
        budget = supervisor.budget()
        return JSONResponse({
            "version": __version__,
            "uptime_s": round(time.time() - started, 1),
            "pid": _pid(),
            "ram": {"total": memory.total, "available": memory.available,
                    "budget": budget.bytes, "budget_source": budget.source},
            "cpu": {"count": psutil.cpu_count(), "load": _load()},
            "max_loaded": supervisor.max_loaded,
            "models": supervisor.status(),
        })

    def admin(action: Callable[[str], Awaitable[object]]) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            requested = request.path_params["name"]
            name = supervisor.resolve(requested)
            if name is None:
                return error_response(404, f"unknown model {requested!r}; known: {_known(supervisor)}")
            try:
                await action(name)
            except CapacityError as exc:
                return error_response(503, str(exc), code="insufficient_memory")
            except ModelError as exc:
                return error_response(503, str(exc))
            row = next(r for r in supervisor.status() if r["name"] == name)
            return JSONResponse(row)

        return handler

    async def logs(request: Request) -> Response:
        requested = request.path_params["name"]
        name = supervisor.resolve(requested)
        if name is None:
            return error_response(404, f"unknown model {requested!r}; known: {_known(supervisor)}")
        raw = request.query_params.get("n", "200")
        if not raw.isdigit():
            return error_response(400, "n must be a non-negative integer")
        count = min(int(raw), 10_000)
        path = log_paths.get(name)
        lines = read_tail(path, count) if path is not None else \
            supervisor.models[name].log.last_lines(count)
        return JSONResponse({"name": name, "lines": lines})

    async def shutdown(request: Request) -> Response:
        on_shutdown()
        return JSONResponse({"status": "stopping"}, status_code=202)

    async def reload(request: Request) -> Response:
        """POST /api/reload (lalo reload): re-read lalo.yaml; a bad file changes nothing."""
        if on_reload is None:
            return error_response(501, "this lalo cannot reload its config")
        result = await on_reload()
        if result.get("status") != "ok":
            return error_response(400, str(result.get("error")), code="bad_config")
        return JSONResponse(result)

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def dashboard(request: Request) -> Response:
        index = DASHBOARD_DIR / "index.html"
        if not index.exists():
            return JSONResponse({"status": "ok", "dashboard": "not built"})
        return FileResponse(index, headers={"cache-control": "no-cache"})

    async def load(name: str) -> None:
        await supervisor.load(name)

    async def unload(name: str) -> None:
        await supervisor.unload(name)

    async def restart(name: str) -> None:
        await supervisor.restart(name)

    routes: list[BaseRoute] = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/upstream/{model}/{path:path}", _RawASGI(upstream),
              methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        Route("/api/status", status, methods=["GET"]),
        Route("/api/models/{name}/load", admin(load), methods=["POST"]),
        Route("/api/models/{name}/unload", admin(unload), methods=["POST"]),
        Route("/api/models/{name}/restart", admin(restart), methods=["POST"]),
        Route("/api/models/{name}/logs", logs, methods=["GET"]),
        Route("/api/shutdown", shutdown, methods=["POST"]),
        Route("/api/reload", reload, methods=["POST"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/", dashboard, methods=["GET"]),
    ]
    if DASHBOARD_DIR.is_dir():
        routes.append(Mount("/static", StaticFiles(directory=DASHBOARD_DIR), name="static"))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error_response(404, f"no route {request.method} {request.url.path}",
                                  code="not_found")
        if exc.status_code == 405:
            return error_response(405, f"{request.method} is not allowed on {request.url.path}")
        return error_response(exc.status_code, str(exc.detail))

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}")

    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )

    async def front(scope: Scope, receive: Receive, send: Send) -> None:
        # The OpenAI routes skip Starlette's routing and middleware: proxy cost is per request.
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in OPENAI_ROUTES:
            await openai(scope, receive, send)
        else:
            await app(scope, receive, send)

    return AuthMiddleware(front, api_keys=settings.api_keys, admin_token=settings.admin_token)


class _RawASGI:
    """Makes Starlette route to an ASGI callable as is (it wraps plain functions as endpoints)."""

    def __init__(self, handler: ASGIApp) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


def _known(supervisor: Supervisor) -> str:
    return ", ".join(supervisor.names_and_aliases()) or "(none configured)"


def _pid() -> int:
    import os

    return os.getpid()


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in psutil.getloadavg()]
    except (AttributeError, OSError):
        return None
