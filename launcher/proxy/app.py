"""The ASGI app on the proxy port: OpenAI routes, pass-through, admin API, metrics, dashboard.

It runs in the same event loop as the supervisor and holds one pooled HTTP client for
every upstream (a new client per request costs tens of milliseconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from launcher import __version__
from launcher import paths as lalo_paths
from launcher.config import ActivityConfig, ApiKey
from launcher.errors import CapacityError, ModelError
from launcher.machine.memory import system_memory
from launcher.proxy.activity import Activity, valid_status_filter
from launcher.proxy.anthropic import AnthropicErrors
from launcher.proxy.auth import AuthMiddleware
from launcher.proxy.errors import error_response
from launcher.proxy.forward import Forwarder, send_error
from launcher.proxy.history import History
from launcher.proxy.hosts import HostGuard
from launcher.proxy.logstream import LaloLog, follow_file, lalo_log
from launcher.proxy.metrics import ProxyMetrics
from launcher.proxy.metrics_merge import MergedMetrics
from launcher.proxy.ollama import OLLAMA_ROUTES, OllamaAPI
from launcher.proxy.peer_metrics import PeerCollector
from launcher.proxy.peers import PeerTable
from launcher.proxy.router import Router
from launcher.proxy.routes import MODEL_ROUTES, BodyTooLarge, ModelRouter, read_body, route_list
from launcher.proxy.upstream import UpstreamBadTarget, UpstreamPool, check_target
from launcher.supervisor.logs import read_tail
from launcher.supervisor.process import Endpoint
from launcher.supervisor.supervisor import Supervisor

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard" / "static"


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
    on_reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
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
    own_log = lalo_log() if settings.capture_own_log else LaloLog()
    closing = closing or asyncio.Event()
    started = time.time()
    too_large = f"request body larger than {settings.max_body_size} bytes"
    model_route = ModelRouter(router, forwarder, settings.max_body_size)
    ollama = OllamaAPI(supervisor, forwarder, settings.max_body_size, started)

    async def health(request: Request) -> Response:
        states = [m.lifecycle for m in supervisor.snapshot().values()]
        return JSONResponse({
            "status": "ok",
            "version": __version__,
            "models_ready": states.count("ready"),
            "models": len(states),
        })

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
        target = upstream_target(scope)
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            check_target(target + (f"?{query}" if query else ""))
        except UpstreamBadTarget as exc:
            return await send_error(send, 400, str(exc))
        headers = dict(scope["headers"])
        await forwarder.forward(
            receive, send, name, scope["method"], target, body, route="upstream", query=query,
            content_type=headers.get(b"content-type", b"application/json").decode("latin-1"),
        )

    async def list_models(request: Request) -> Response:
        data: list[dict[str, Any]] = []
        for name, model in supervisor.snapshot().items():
            entry = {"object": "model", "created": int(started), "owned_by": "lalo",
                     "state": model.state}
            data.append({"id": name, **entry, "aliases": list(model.aliases)})
            data.extend({"id": alias, **entry, "parent": name} for alias in model.aliases)
        if peers is not None:  # models only peers serve, marked `owned_by: peer:NAME`
            data.extend(peers.model_entries(
                lambda name: supervisor.resolve(name) is not None,
                int(started)))
        return JSONResponse({"object": "list", "data": data})

    async def status(request: Request) -> Response:
        memory = system_memory()
        budget = supervisor.budget()
        note = memory.limit_note()
        return JSONResponse({
            "version": __version__,
            "uptime_s": round(time.time() - started, 1),
            "pid": _pid(),
            "ram": {**memory.to_json(), "budget": budget.bytes,
                    "budget_source": budget.source + (f"; {note}" if note else "")},
            "cpu": {"count": psutil.cpu_count(), "load": _load()},
            "max_loaded": supervisor.max_loaded,
            "models": supervisor.status(),
            "peers": peers.status() if peers is not None else [],
            "activity": {"total": activity.total},
        })

    async def activity_list(request: Request) -> Response:
        """GET /api/activity?model=&status=&n=: recent requests, newest first."""
        query = request.query_params
        raw = query.get("n", "100")
        if not raw.isdigit():
            return error_response(400, "n must be a non-negative integer")
        wanted_model = query.get("model") or None
        if wanted_model is not None:
            resolved = supervisor.resolve(wanted_model)
            if resolved is None:
                return error_response(
                    404, f"unknown model {wanted_model!r}; known: {_known(supervisor)}")
            wanted_model = resolved
        wanted_status = query.get("status") or None
        if wanted_status is not None and not valid_status_filter(wanted_status):
            return error_response(400, "status must be a code (200), a class (2xx, 5xx) "
                                       "or 'error'")
        rows = activity.query(wanted_model, wanted_status, min(int(raw), activity.config.size))
        return JSONResponse({"total": activity.total, "size": activity.config.size,
                             "requests": rows})

    async def history_view(request: Request) -> Response:
        """GET /api/history?since=T: the chart samples (oldest first) taken after T."""
        raw = request.query_params.get("since")
        try:
            since = float(raw) if raw else None
        except ValueError:
            return error_response(400, "since must be a unix time in seconds")
        return JSONResponse({"interval": history.interval, "span": history.ring.capacity *
                             history.interval, "samples": history.ring.items(since)})

    def _model(request: Request) -> str | Response:
        """The model the path names (name or alias), or the 404 that says which exist."""
        requested = request.path_params["name"]
        name = supervisor.resolve(requested)
        if name is None:
            return error_response(404, f"unknown model {requested!r}; known: {_known(supervisor)}")
        return name

    def _lines(request: Request, default: str, cap: int) -> int | Response:
        """The `n` query parameter (lines wanted), at most `cap`, or the 400."""
        raw = request.query_params.get("n", default)
        if not raw.isdigit():
            return error_response(400, "n must be a non-negative integer")
        return min(int(raw), cap)

    def _sse(events: Any) -> Response:
        return StreamingResponse(events, media_type="text/event-stream", headers={
            "cache-control": "no-cache", "x-accel-buffering": "no"})

    def _model_lines(request: Request, default: str) -> tuple[str, int] | Response:
        """The model the path names and the lines wanted of its log, or the 404/400."""
        name = _model(request)
        if isinstance(name, Response):
            return name
        count = _lines(request, default, 10_000)
        return count if isinstance(count, Response) else (name, count)

    async def logs_stream(request: Request) -> Response:
        """GET /api/models/NAME/logs/stream?n=100: the log's tail, then new lines, as SSE."""
        asked = _model_lines(request, "100")
        if isinstance(asked, Response):
            return asked
        name, count = asked
        # the model's own record says where: a model added by a reload has it at once
        path = supervisor.snapshot()[name].log_path
        return _sse(follow_file(path, count, closing=closing))

    async def own_logs_stream(request: Request) -> Response:
        """GET /api/logs/stream?n=100: lalo's own log records as SSE."""
        count = _lines(request, "100", 1000)
        if isinstance(count, Response):
            return count
        return _sse(own_log.follow(count, closing=closing))

    def admin(action: Callable[[str], Awaitable[object]]) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            name = _model(request)
            if isinstance(name, Response):
                return name
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
        asked = _model_lines(request, "200")
        if isinstance(asked, Response):
            return asked
        name, count = asked
        lines = read_tail(supervisor.snapshot()[name].log_path, count)
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
        await merged.refresh()
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
        Route("/api/models/{name}/logs/stream", logs_stream, methods=["GET"]),
        Route("/api/logs/stream", own_logs_stream, methods=["GET"]),
        Route("/api/activity", activity_list, methods=["GET"]),
        Route("/api/history", history_view, methods=["GET"]),
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
            routes_here = route_list(OLLAMA_ROUTES, paths)
            return error_response(
                404, f"no route {request.method} {request.url.path}; routes: {routes_here}",
                code="not_found")
        if exc.status_code == 405:
            return error_response(405, f"{request.method} is not allowed on {request.url.path}")
        return error_response(exc.status_code, str(exc.detail))

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}")

    paths = [route.path for route in routes if isinstance(route, Route)]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )

    async def front(scope: Scope, receive: Receive, send: Send) -> None:
        # The model routes skip Starlette's routing and middleware: proxy cost is per request.
        if scope["type"] == "http" and scope["path"] in MODEL_ROUTES:
            await model_route(scope, receive, send)
        elif scope["type"] == "http" and scope["path"] in OLLAMA_ROUTES:
            await ollama(scope, receive, send)
        else:
            await app(scope, receive, send)

    with contextlib.suppress(RuntimeError):  # no running loop: nothing is sampled
        asyncio.get_running_loop()
        history.start()
    guarded = AnthropicErrors(
        AuthMiddleware(front, api_keys=settings.api_keys, admin_token=settings.admin_token,
                       model_paths=[*MODEL_ROUTES, *OLLAMA_ROUTES]))
    return HostGuard(guarded, listen_host=settings.listen_host,
                     allowed_hosts=settings.allowed_hosts, cors_origins=settings.cors_origins)


class _RawASGI:
    """Makes Starlette route to an ASGI callable as is (it wraps plain functions as endpoints)."""

    def __init__(self, handler: ASGIApp) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


def upstream_target(scope: Scope) -> str:
    """The path after `/upstream/MODEL` exactly as the client sent it (still percent-encoded).

    The decoded path would turn `%20` into a space and `%0D%0A` into a line break in the
    request line to the model server.
    """
    raw: bytes | None = scope.get("raw_path")
    if raw is None:  # a server that does not pass the raw path: encode the decoded one again
        return "/" + quote(scope["path_params"]["path"], safe="/:@!$&'()*+,;=-._~")
    rest = raw.split(b"/", 3)  # b"", b"upstream", MODEL, the rest
    return "/" + (rest[3].decode("latin-1") if len(rest) > 3 else "")


def _ready_endpoints(supervisor: Supervisor) -> dict[str, Endpoint]:
    """The model servers that answer now (a sleeping one is left asleep)."""
    ready = {}
    for name, model in supervisor.snapshot().items():
        if model.serving and model.endpoint is not None:
            ready[name] = model.endpoint
    return ready


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
