"""`lalo up`: config -> plan -> engines -> model servers + proxy on one event loop; staged shutdown.

Signal handlers only record the signal; the runner acts on it: stop accepting, let the
requests in flight finish (within `stop_timeout`), then stop every model server (TERM, wait,
KILL the group), release the instance lock. The parts: prepare (models and plan),
engine_setup, factory (model servers and supervisor), proxy_server, signals, preload,
announce, reloader.
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from launcher import __version__
from launcher.config import LoadedConfig
from launcher.engines.base import Engine
from launcher.placement.cpu_share import config_share
from launcher.placement.measurements import Measurements
from launcher.serve.announce import Announce, peers_line, plan_lines, serving_lines
from launcher.serve.engine_setup import engines_for
from launcher.serve.factory import ServerFactory, build_supervisor, log_dir
from launcher.serve.preload import preload, until_spawned
from launcher.serve.prepare import Prepared, prepare
from launcher.serve.proxy_server import ProxyServer, bind_socket, display_host, proxy_settings
from launcher.serve.reloader import Reloader
from launcher.serve.signals import Signals
from launcher.supervisor import platform
from launcher.supervisor.instance import ChildRecords, InstanceInfo, InstanceLock

if TYPE_CHECKING:  # imported at run time only once the model servers are starting
    from launcher.models.catalog import CatalogResolver
    from launcher.proxy.peers import PeerTable
    from launcher.proxy.upstream import UpstreamPool


@dataclass(frozen=True)
class UpOptions:
    host: str | None = None
    port: int | None = None


async def serve(
    loaded: LoadedConfig,
    options: UpOptions,
    announce: Announce,
    *,
    catalog: CatalogResolver | None = None,
) -> int:
    """Run until Ctrl+C (130), SIGTERM or `lalo down` (0)."""
    config = loaded.config
    host = options.host or config.proxy.host
    port = options.port if options.port is not None else config.proxy.port
    peers = None
    if config.peers:
        from launcher.proxy.peers import PeerTable

        # a peer's key missing from the environment, an unreadable CA file: now, not later
        peers = PeerTable.from_config(config, base_dir=loaded.base_dir)
    lock = InstanceLock()
    lock.acquire()
    try:
        records = ChildRecords()
        reaped = records.reap_stale()
        if reaped:
            announce(f"stopped {len(reaped)} model server(s) left by a lalo that was killed: "
                     f"pids {', '.join(map(str, reaped))}")
        measurements = Measurements()
        prepared = prepare(loaded, measurements, catalog)
        engines = engines_for(loaded, prepared.models, announce)
        sock = bind_socket(host, port)
        runner = Runner(loaded, prepared, engines, records, measurements, announce,
                        lock=lock, host=host, port=port, peers=peers)
        return await runner.run(sock)
    finally:
        lock.release()


class Runner:
    """One `lalo up` once its models are planned and its port bound.

    `run` is the whole life: `start` (model servers first, then the proxy), serve until a
    signal or `lalo down` asks to stop, `stop` (staged), and `close`, which always runs.
    `reload` (SIGHUP, `POST /api/reload`) may come any time in between.
    """

    def __init__(self, loaded: LoadedConfig, prepared: Prepared, engines: dict[str, Engine],
                 records: ChildRecords, measurements: Measurements, announce: Announce, *,
                 lock: InstanceLock, host: str, port: int,
                 peers: PeerTable | None = None) -> None:
        self.loaded = loaded
        self.prepared = prepared
        self.announce = announce
        self.lock = lock
        self.host = host
        self.port = port
        self.peers = peers
        self.admin_token = secrets.token_urlsafe(32)
        models, offload = prepared.models, prepared.offload
        self.share = config_share(models, loaded.config.resources.max_loaded)
        self.supervisor = build_supervisor(loaded, models, engines, records, measurements,
                                           self.share, host="127.0.0.1", offload=offload)
        self.reloader = Reloader(
            loaded, models, self.supervisor,
            ServerFactory(loaded, engines, self.supervisor.events, self.share, "127.0.0.1", offload),
            measurements, announce, ctx_budget=prepared.plan.budget.bytes)
        self.stopping = asyncio.Event()
        self.exit_code = 0
        self.proxy: ProxyServer | None = None  # set once the proxy runs
        self.pool: UpstreamPool | None = None
        self._loading: asyncio.Task[None] | None = None
        self._reloads: set[asyncio.Task[Any]] = set()

    async def run(self, sock: socket.socket) -> int:
        """Serve on `sock` until asked to stop; the exit code (130 for Ctrl+C, else 0)."""
        signals = Signals(on_stop=self.request_stop, on_hangup=self.reload_soon)
        signals.install()
        try:
            await self.start(sock)
            assert self.proxy is not None
            await self.proxy.serve_until(self.stopping)
            await self.stop()
            return self.exit_code
        finally:
            await self.close()
            signals.remove()

    async def start(self, sock: socket.socket) -> None:
        """Start the preload models, then the proxy on `sock`; announce where it serves."""
        config = self.loaded.config
        # Model servers first: they load while the proxy stack is imported and started.
        names = [d.name for d in self.prepared.plan.decisions if d.action == "start"]
        self._loading = asyncio.create_task(preload(self.supervisor, names, self.announce))
        await until_spawned(self.supervisor, names)
        from launcher.proxy.app import create_app
        from launcher.proxy.upstream import UpstreamPool

        # llama-server closes idle connections after 5 s: drop ours first, never reuse a dead one
        self.pool = UpstreamPool(keepalive_expiry=4.0)
        app = create_app(self.supervisor, proxy_settings(config, self.host, self.admin_token),
                         self.pool, on_shutdown=lambda: self.request_stop(0),
                         on_reload=self.reload, peers=self.peers, closing=self.stopping)
        self.proxy = ProxyServer(app, config.supervisor.stop_timeout)
        self.proxy.start(sock)
        # everything made so far lives until exit: keep it out of the garbage collector's
        # scans, which otherwise stall request handling now and then (the p99 latency)
        gc.freeze()
        await self.proxy.until_started()
        url = f"http://{display_host(self.host)}:{self.port}"
        self._publish(url)
        prepared = self.prepared
        governed = [name for name, meta in self.supervisor.info.items() if meta.governed]
        for line in serving_lines(url, self.loaded, prepared.plan, self.share, prepared.offload,
                                  prepared.models, governed):
            self.announce(line)
        self.supervisor.start_background()
        if self.peers:
            self.peers.start()
            self.announce(peers_line(self.peers))
        for line in plan_lines(prepared.plan):
            self.announce(line)

    async def reload(self) -> dict[str, Any]:
        """Re-read lalo.yaml and apply what changed (`Reloader`); the summary."""
        return await self.reloader.reload()

    def reload_soon(self) -> None:
        """SIGHUP: reload in a task of its own (cancelled by `close` if still running)."""
        task = asyncio.get_running_loop().create_task(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    def request_stop(self, code: int) -> None:
        """Ask `run` to stop with exit code `code`; asked again: without waiting for requests."""
        if self.stopping.is_set() and self.proxy is not None:
            self.proxy.force_exit()  # a second Ctrl+C: do not wait for requests
        self.exit_code = code
        self.stopping.set()

    async def stop(self) -> None:
        """Staged: stop accepting, let the requests in flight finish (within stop_timeout),
        end the rest, and only then stop the model servers they were talking to."""
        busy = sum(row["in_flight"] for row in self.supervisor.status())
        self.announce("stopping: no new requests"
                      + (f"; letting {busy} request(s) in flight finish (Ctrl+C again: at once)"
                         if busy else ""))
        if self._loading is not None:
            self._loading.cancel()
        if self.proxy is not None:
            await self.proxy.drain()
        self.announce("stopping model servers")
        await self.supervisor.close()
        self.announce("stopped")

    async def close(self) -> None:
        """Release everything `start` made, whatever happened (safe after `stop`)."""
        if self.proxy is not None:
            await self.proxy.close()
        await self.supervisor.close()
        if self.peers is not None:
            await self.peers.close()
        if self.pool is not None:
            await self.pool.aclose()
        for task in list(self._reloads):
            task.cancel()

    def _publish(self, url: str) -> None:
        """The instance file `lalo status`, `lalo down` and `lalo reload` find this lalo by."""
        me = os.getpid()
        self.lock.publish(InstanceInfo(
            pid=me, created=platform.create_time(me) or time.time(), url=url,
            started_at=time.time(), admin_token=self.admin_token,
            config=self.loaded.describe_source(), version=__version__, log_dir=str(log_dir()),
        ))
