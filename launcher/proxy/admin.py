"""The proxy port's own API beside the model routes: health, the model list, status, activity,
history, logs, load/unload/restart, reload, shutdown, metrics and the dashboard page.

Each method is one Starlette endpoint; `launcher.proxy.app` maps paths to them.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from launcher import __version__
from launcher.errors import CapacityError, ModelError
from launcher.machine.memory import system_memory
from launcher.proxy.activity import Activity, valid_status_filter
from launcher.proxy.errors import error_response
from launcher.proxy.history import History
from launcher.proxy.logstream import LaloLog, follow_file
from launcher.proxy.metrics import ProxyMetrics
from launcher.proxy.metrics_merge import MergedMetrics
from launcher.proxy.peers import PeerTable
from launcher.proxy.router import Router
from launcher.supervisor.logs import read_tail
from launcher.supervisor.supervisor import Supervisor

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard" / "static"
Reload = Callable[[], Awaitable[dict[str, Any]]]


class AdminAPI:
    """The endpoints of lalo's own routes, over one supervisor (and its peers, if any).

    `on_shutdown` is called by `POST /api/shutdown` (lalo down), `on_reload` by
    `POST /api/reload`; `closing` is set when lalo stops, and ends the open log streams then,
    so that they do not hold up the drain of the requests in flight.
    """

    def __init__(self, supervisor: Supervisor, router: Router, *, activity: Activity,
                 history: History, metrics: ProxyMetrics, merged: MergedMetrics,
                 own_log: LaloLog, closing: asyncio.Event, started: float,
                 on_shutdown: Callable[[], None], on_reload: Reload | None,
                 peers: PeerTable | None = None) -> None:
        self.supervisor = supervisor
        self.router = router
        self.activity = activity
        self.history = history
        self.metrics = metrics
        self.merged = merged
        self.own_log = own_log
        self.closing = closing
        self.started = started
        self.on_shutdown = on_shutdown
        self.on_reload = on_reload
        self.peers = peers

    async def health(self, request: Request) -> Response:
        states = [m.lifecycle for m in self.supervisor.snapshot().values()]
        return JSONResponse({
            "status": "ok",
            "version": __version__,
            "models_ready": states.count("ready"),
            "models": len(states),
        })

    async def list_models(self, request: Request) -> Response:
        data: list[dict[str, Any]] = []
        for name, model in self.supervisor.snapshot().items():
            entry: dict[str, Any] = {"object": "model", "created": int(self.started),
                                     "owned_by": "lalo", "state": model.state}
            if model.capabilities is not None:
                entry["capabilities"] = model.capabilities.names()
            data.append({"id": name, **entry, "aliases": list(model.aliases)})
            data.extend({"id": alias, **entry, "parent": name} for alias in model.aliases)
        if self.peers is not None:  # models only peers serve, marked `owned_by: peer:NAME`
            data.extend(self.peers.model_entries(
                lambda name: self.supervisor.resolve(name) is not None,
                int(self.started)))
        return JSONResponse({"object": "list", "data": data})

    async def status(self, request: Request) -> Response:
        memory = system_memory()
        budget = self.supervisor.budget()
        note = memory.limit_note()
        return JSONResponse({
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "pid": os.getpid(),
            "ram": {**memory.to_json(), "budget": budget.bytes,
                    "budget_source": budget.source + (f"; {note}" if note else "")},
            "cpu": {"count": psutil.cpu_count(), "load": _load(),
                    "threads": self.supervisor.thread_share()},
            "max_loaded": self.supervisor.max_loaded,
            "models": self.supervisor.status(),
            "peers": self.peers.status() if self.peers is not None else [],
            "activity": {"total": self.activity.total},
        })

    async def activity_list(self, request: Request) -> Response:
        """GET /api/activity?model=&status=&n=: recent requests, newest first."""
        query = request.query_params
        raw = query.get("n", "100")
        if not raw.isdigit():
            return error_response(400, "n must be a non-negative integer")
        wanted_model = query.get("model") or None
        if wanted_model is not None:
            resolved = self.supervisor.resolve(wanted_model)
            if resolved is None:
                return error_response(404, f"unknown model {wanted_model!r}; known: "
                                           f"{self.router.known(peers=False)}")
            wanted_model = resolved
        wanted_status = query.get("status") or None
        if wanted_status is not None and not valid_status_filter(wanted_status):
            return error_response(400, "status must be a code (200), a class (2xx, 5xx) "
                                       "or 'error'")
        activity = self.activity
        rows = activity.query(wanted_model, wanted_status, min(int(raw), activity.config.size))
        return JSONResponse({"total": activity.total, "size": activity.config.size,
                             "requests": rows})

    async def history_view(self, request: Request) -> Response:
        """GET /api/history?since=T: the chart samples (oldest first) taken after T."""
        raw = request.query_params.get("since")
        try:
            since = float(raw) if raw else None
        except ValueError:
            return error_response(400, "since must be a unix time in seconds")
        history = self.history
        return JSONResponse({"interval": history.interval, "span": history.ring.capacity *
                             history.interval, "samples": history.ring.items(since)})

    async def logs(self, request: Request) -> Response:
        """GET /api/models/NAME/logs?n=200: the last lines of the model's log."""
        asked = self._model_lines(request, "200")
        if isinstance(asked, Response):
            return asked
        name, count = asked
        lines = read_tail(self.supervisor.snapshot()[name].log_path, count)
        return JSONResponse({"name": name, "lines": lines})

    async def logs_stream(self, request: Request) -> Response:
        """GET /api/models/NAME/logs/stream?n=100: the log's tail, then new lines, as SSE."""
        asked = self._model_lines(request, "100")
        if isinstance(asked, Response):
            return asked
        name, count = asked
        # the model's own record says where: a model added by a reload has it at once
        path = self.supervisor.snapshot()[name].log_path
        return _sse(follow_file(path, count, closing=self.closing))

    async def own_logs_stream(self, request: Request) -> Response:
        """GET /api/logs/stream?n=100: lalo's own log records as SSE."""
        count = _lines(request, "100", 1000)
        if isinstance(count, Response):
            return count
        return _sse(self.own_log.follow(count, closing=self.closing))

    async def load(self, request: Request) -> Response:
        return await self._act(request, self.supervisor.load)

    async def unload(self, request: Request) -> Response:
        return await self._act(request, self.supervisor.unload)

    async def restart(self, request: Request) -> Response:
        return await self._act(request, self.supervisor.restart)

    async def shutdown(self, request: Request) -> Response:
        self.on_shutdown()
        return JSONResponse({"status": "stopping"}, status_code=202)

    async def reload(self, request: Request) -> Response:
        """POST /api/reload (lalo reload): re-read lalo.yaml; a bad file changes nothing."""
        if self.on_reload is None:
            return error_response(501, "this lalo cannot reload its config")
        result = await self.on_reload()
        if result.get("status") != "ok":
            return error_response(400, str(result.get("error")), code="bad_config")
        return JSONResponse(result)

    async def prometheus(self, request: Request) -> Response:
        await self.merged.refresh()
        return Response(self.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def dashboard(self, request: Request) -> Response:
        index = DASHBOARD_DIR / "index.html"
        if not index.exists():
            return JSONResponse({"status": "ok", "dashboard": "not built"})
        return FileResponse(index, headers={"cache-control": "no-cache"})

    async def _act(self, request: Request,
                   action: Callable[[str], Awaitable[object]]) -> Response:
        """Load, unload or restart the model the path names; its status row, or the error."""
        name = self._model(request)
        if isinstance(name, Response):
            return name
        try:
            await action(name)
        except CapacityError as exc:
            return error_response(503, str(exc), code="insufficient_memory")
        except ModelError as exc:
            return error_response(503, str(exc))
        row = next(r for r in self.supervisor.status() if r["name"] == name)
        return JSONResponse(row)

    def _model(self, request: Request) -> str | Response:
        """The model the path names (name or alias), or the 404 that says which exist."""
        requested = request.path_params["name"]
        name = self.supervisor.resolve(requested)
        if name is None:
            return error_response(404, f"unknown model {requested!r}; known: "
                                       f"{self.router.known(peers=False)}")
        return name

    def _model_lines(self, request: Request, default: str) -> tuple[str, int] | Response:
        """The model the path names and the lines wanted of its log, or the 404/400."""
        name = self._model(request)
        if isinstance(name, Response):
            return name
        count = _lines(request, default, 10_000)
        return count if isinstance(count, Response) else (name, count)


def _lines(request: Request, default: str, cap: int) -> int | Response:
    """The `n` query parameter (lines wanted), at most `cap`, or the 400."""
    raw = request.query_params.get("n", default)
    if not raw.isdigit():
        return error_response(400, "n must be a non-negative integer")
    return min(int(raw), cap)


def _sse(events: Any) -> Response:
    return StreamingResponse(events, media_type="text/event-stream", headers={
        "cache-control": "no-cache", "x-accel-buffering": "no"})


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in psutil.getloadavg()]
    except (AttributeError, OSError):
        return None
