"""The proxy's side of `lalo up`: its port bound early, its settings from the config, and
uvicorn serving it without signal handling of its own, stopped in stages."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import sys
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from launcher.config import ApiKey, Config
from launcher.errors import StartupError

if TYPE_CHECKING:  # imported at run time only once the model servers are starting
    from launcher.proxy.app import ProxySettings

# How long the proxy keeps an idle client connection open (see _uvicorn_server).
CLIENT_KEEPALIVE_S = 30


def api_keys(config: Config) -> tuple[ApiKey, ...]:
    """Configured keys plus $LALO_API_KEYS (comma separated; admin keys named env1, env2...)."""
    extra = [key.strip() for key in os.environ.get("LALO_API_KEYS", "").split(",") if key.strip()]
    known = {entry.key for entry in config.proxy.api_keys}
    taken = {entry.name for entry in config.proxy.api_keys}
    names = (f"env{n}" for n in range(1, 10_000) if f"env{n}" not in taken)
    added = [ApiKey(key=key, name=next(names))
             for key in dict.fromkeys(k for k in extra if k not in known)]
    return (*config.proxy.api_keys, *added)


def proxy_settings(config: Config, host: str, admin_token: str) -> ProxySettings:
    from launcher.proxy.app import ProxySettings

    return ProxySettings(
        api_keys=api_keys(config),
        admin_token=admin_token,
        max_body_size=config.proxy.max_body_size,
        upstream_timeout=config.proxy.upstream_timeout,
        listen_host=host,
        allowed_hosts=config.proxy.allowed_hosts,
        cors_origins=config.proxy.cors_origins,
        activity=config.proxy.activity,
        capture_own_log=True,
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the proxy port now, so that a taken port is one clear error before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if sys.platform != "win32":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"port {port} on {host} is already in use; stop what uses it or pass --port"
            ) from None
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def display_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class ProxyServer:
    """uvicorn serving the proxy app on a bound socket: `start`, `until_started`,
    `serve_until` a stop is asked, `drain` (staged), and `close`, which always ends it."""

    def __init__(self, app: Any, stop_timeout: float) -> None:
        self.server = _uvicorn_server(app, stop_timeout)
        self.stop_timeout = stop_timeout
        self.serving: asyncio.Task[None] | None = None

    def start(self, sock: socket.socket) -> None:
        self.serving = asyncio.create_task(self.server.serve(sockets=[sock]))

    async def until_started(self) -> None:
        assert self.serving is not None
        while not self.server.started:
            if self.serving.done():
                self.serving.result()
                raise StartupError("the proxy stopped while starting")
            await asyncio.sleep(0.01)

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Until `stop` is set; StartupError (or the server's own) if the proxy stops first."""
        assert self.serving is not None
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({stopped, self.serving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if self.serving.done() and not stop.is_set():
            self.serving.result()
            raise StartupError("the proxy stopped unexpectedly")

    def force_exit(self) -> None:
        """Stop without waiting for the requests in flight (a second Ctrl+C)."""
        self.server.force_exit = True

    async def drain(self) -> None:
        """Stop accepting, let the requests in flight finish (uvicorn waits up to stop_timeout),
        then end those still running."""
        assert self.serving is not None
        self.server.should_exit = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.stop_timeout + 5):
                await asyncio.shield(self.serving)
        # requests still running (a second Ctrl+C) are ended here, their upstream connections
        # closed, so that each model server stops its generation and exits at once
        leftover = [task for task in self.server.server_state.tasks if not task.done()]
        for task in leftover:
            task.cancel()
        if leftover:
            await asyncio.wait(leftover, timeout=5)

    async def close(self) -> None:
        if self.serving is not None and not self.serving.done():
            self.server.force_exit = True
            self.serving.cancel()
            with contextlib.suppress(BaseException):
                await self.serving


def _uvicorn_server(app: Any, stop_timeout: float = 10.0) -> Any:
    """uvicorn without its own signal handling: lalo's main loop owns signals."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            yield

    # No WebSocket protocol (lalo serves none) and uvicorn's errors through lalo's own logging
    # rather than its dictConfig: less to import and set up while the model servers load.
    # Idle keep-alive connections live CLIENT_KEEPALIVE_S, longer than clients keep theirs
    # (httpx and the OpenAI SDK 5 s, LaloClient 20 s): a client must never send a request on a
    # connection the server is closing at that moment (uvicorn's default is also 5 s).
    return Server(uvicorn.Config(
        app, log_level="warning", lifespan="off", access_log=False,
        timeout_graceful_shutdown=max(1, round(stop_timeout)), loop="none", ws="none", log_config=None,
        timeout_keep_alive=CLIENT_KEEPALIVE_S,
    ))
