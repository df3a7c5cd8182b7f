"""The ASGI app on the proxy port: OpenAI routes, pass-through, admin API, metrics, dashboard.

It runs in the same event loop as the supervisor and holds one pooled HTTP client for
every upstream (a new client per request costs tens of milliseconds). The model routes
(`routes.py`, `ollama.py`) skip Starlette; lalo's own routes are the table below, served by
`AdminAPI`; in front of it all: hosts -> Anthropic's error shape -> auth.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from launcher import paths as lalo_paths
from launcher.config import ActivityConfig, ApiKey
from launcher.proxy.activity import Activity
from launcher.proxy.admin import DASHBOARD_DIR, AdminAPI, Reload
from launcher.proxy.anthropic import AnthropicErrors
from launcher.proxy.auth import AuthMiddleware
from launcher.proxy.errors import error_response
from launcher.proxy.forward import Forwarder
from launcher.proxy.history import History
from launcher.proxy.hosts import HostGuard
from launcher.proxy.logstream import LaloLog, lalo_log
from launcher.proxy.metrics import ProxyMetrics
from launcher.proxy.metrics_merge import MergedMetrics
from launcher.proxy.ollama import OLLAMA_ROUTES, OllamaAPI
from launcher.proxy.passthrough import Passthrough
from launcher.proxy.peer_metrics import PeerCollector
from launcher.proxy.peers import PeerTable
from launcher.proxy.router import Router
from launcher.proxy.routes import MODEL_ROUTES, ModelRouter, route_list
from launcher.proxy.upstream import UpstreamPool
from launcher.supervisor.process import Endpoint
from launcher.supervisor.supervisor import Supervisor


@dataclass(frozen=True)
class ProxySettings:
    api_keys: tuple[ApiKey | str, ...] = ()  # a plain string is an admin key
    admin_token: str = ""
    max_body_size: int = 16 * 1024**2
    upstream_timeout: float = 600.0
    listen_host: str = "127.0.0.1"  # on loopback, requests for other Host names are refused
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    activity: ActivityConfig = field(default_factory=ActivityConfig)
    capture_own_log: bool = False  # `lalo up` shows its own log on the dashboard


def create_app(
    supervisor: Supervisor,
    settings: ProxySettings,
    pool: UpstreamPool,
    *,
    on_shutdown: Callable[[], None] = lambda: None,
    on_reload: Reload | None = None,
    peers: PeerTable | None = None,
    closing: asyncio.Event | None = None,
) -> ASGIApp:
    """The proxy app; `on_shutdown` is called by `POST /api/shutdown` (lalo down); `peers`:
    other servers whose models are served here too (launcher.proxy.peers).

    `closing` is set when lalo stops: open log streams end then, so that they do not hold up
    the drain of the requests in flight. `settings.capture_own_log` attaches the dashboard's
    view of lalo's own log to the `launcher` loggers (at INFO).
    """
    activity = Activity(settings.activity, store_path=lalo_paths.state_dir() / "activity.sqlite")
    history = History(supervisor, activity)
    merged = MergedMetrics(lambda: _ready_endpoints(supervisor), pool)
    metrics = ProxyMetrics(supervisor, activity, merged)
    if peers is not None:
        metrics.registry.register(PeerCollector(peers))
    router = Router(supervisor, peers)
    forwarder = Forwarder(router, pool, metrics, settings.upstream_timeout, activity=activity)
    started = time.time()
    api = AdminAPI(
        supervisor, router, activity=activity, history=history, metrics=metrics, merged=merged,
        own_log=lalo_log() if settings.capture_own_log else LaloLog(),
        closing=closing or asyncio.Event(), started=started, on_shutdown=on_shutdown,
        on_reload=on_reload, peers=peers)
    front = _Front(
        ModelRouter(router, forwarder, settings.max_body_size),
        OllamaAPI(supervisor, forwarder, settings.max_body_size, started),
        _starlette(route_table(api, Passthrough(supervisor, router, forwarder,
                                                 settings.max_body_size))),
    )
    with contextlib.suppress(RuntimeError):  # no running loop: nothing is sampled
        asyncio.get_running_loop()
        history.start()
    guarded = AnthropicErrors(
        AuthMiddleware(front, api_keys=settings.api_keys, admin_token=settings.admin_token,
                       model_paths=[*MODEL_ROUTES, *OLLAMA_ROUTES]))
    return HostGuard(guarded, listen_host=settings.listen_host,
                     allowed_hosts=settings.allowed_hosts, cors_origins=settings.cors_origins)


def route_table(api: AdminAPI, passthrough: Passthrough) -> list[BaseRoute]:
    """lalo's own routes (the model routes are `MODEL_ROUTES` and `OLLAMA_ROUTES`)."""
    routes: list[BaseRoute] = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.list_models, methods=["GET"]),
        # an ASGI callable, not a function: Starlette routes to it as it is
        Route("/upstream/{model}/{path:path}", passthrough,
              methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        Route("/api/status", api.status, methods=["GET"]),
        Route("/api/models/{name}/load", api.load, methods=["POST"]),
        Route("/api/models/{name}/unload", api.unload, methods=["POST"]),
        Route("/api/models/{name}/restart", api.restart, methods=["POST"]),
        Route("/api/models/{name}/logs", api.logs, methods=["GET"]),
        Route("/api/models/{name}/logs/stream", api.logs_stream, methods=["GET"]),
        Route("/api/logs/stream", api.own_logs_stream, methods=["GET"]),
        Route("/api/activity", api.activity_list, methods=["GET"]),
        Route("/api/history", api.history_view, methods=["GET"]),
        Route("/api/shutdown", api.shutdown, methods=["POST"]),
        Route("/api/reload", api.reload, methods=["POST"]),
        Route("/metrics", api.prometheus, methods=["GET"]),
        Route("/", api.dashboard, methods=["GET"]),
    ]
    if DASHBOARD_DIR.is_dir():
        routes.append(Mount("/static", StaticFiles(directory=DASHBOARD_DIR), name="static"))
    return routes


def _starlette(routes: list[BaseRoute]) -> Starlette:
    """`routes` with the proxy's error envelope for what Starlette answers itself."""
    paths = [route.path for route in routes if isinstance(route, Route)]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            routes_here = route_list(OLLAMA_ROUTES, paths)
            return error_response(
                404, f"no route {request.method} {request.url.path}; routes: {routes_here}",
                code="not_found")
        if exc.status_code == 405:
            return error_response(405, f"{request.method} is not allowed on {request.url.path}")
        return error_response(exc.status_code, str(exc.detail))

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}")

    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )


class _Front:
    """The model routes skip Starlette's routing and middleware: proxy cost is per request."""

    def __init__(self, model_route: ASGIApp, ollama: ASGIApp, app: ASGIApp) -> None:
        self.model_route = model_route
        self.ollama = ollama
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in MODEL_ROUTES:
            await self.model_route(scope, receive, send)
        elif scope["type"] == "http" and scope["path"] in OLLAMA_ROUTES:
            await self.ollama(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _ready_endpoints(supervisor: Supervisor) -> dict[str, Endpoint]:
    """The model servers that answer now (a sleeping one is left asleep)."""
    ready = {}
    for name, model in supervisor.snapshot().items():
        if model.serving and model.endpoint is not None:
            ready[name] = model.endpoint
    return ready
