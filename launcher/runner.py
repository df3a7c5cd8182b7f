"""`lalo up`: config -> plan -> engines -> model servers + proxy on one event loop; staged shutdown.

Signal handlers only record the signal; the main coroutine acts on it: stop accepting,
stop every model server (TERM, wait, KILL the group), release the instance lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher import __version__, paths
from launcher.config import Config, LoadedConfig
from launcher.cpu_share import CpuShare, config_share, policy_line, wait_env
from launcher.engines.base import Engine, ServerSettings
from launcher.engines.llama_cpp_python import LlamaCppPythonEngine
from launcher.engines.llama_server import LlamaServerEngine
from launcher.engines.llamafile import LlamafileEngine
from launcher.errors import EngineError, LaloError, StartupError
from launcher.measurements import Measurements, measurement_key, with_measurements
from launcher.models.resolve import CatalogResolver, ResolvedModel, resolve_models
from launcher.planner import Plan, compute_budget, make_plan
from launcher.supervisor import platform
from launcher.supervisor.instance import ChildRecords, InstanceInfo, InstanceLock
from launcher.supervisor.logs import ModelLog
from launcher.supervisor.policy import RestartPolicy
from launcher.supervisor.process import ManagedModel, Timeouts
from launcher.supervisor.server_options import sleep_and_prompt_cache, uses_sliding_window
from launcher.supervisor.sleep import props_sleeping
from launcher.supervisor.supervisor import SupervisedModel, Supervisor, SupervisorEvents
from launcher.units import format_size

if TYPE_CHECKING:  # imported at run time only once the model servers are starting
    from launcher.proxy.upstream import UpstreamPool

log = logging.getLogger(__name__)
Announce = Callable[[str], None]
EXIT_INTERRUPTED = 130
# How long the proxy keeps an idle client connection open (see _uvicorn_server).
CLIENT_KEEPALIVE_S = 30


@dataclass(frozen=True)
class UpOptions:
    host: str | None = None
    port: int | None = None


def log_dir() -> Path:
    return paths.state_dir() / "logs"


def api_keys(config: Config) -> tuple[str, ...]:
    """Configured keys plus $LALO_API_KEYS (comma separated)."""
    extra = [key.strip() for key in os.environ.get("LALO_API_KEYS", "").split(",") if key.strip()]
    return tuple(dict.fromkeys([*config.proxy.api_keys, *extra]))


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


def engines_for(
    loaded: LoadedConfig,
    models: Sequence[ResolvedModel],
    announce: Announce,
    build: Callable[[str, Announce], Path] | None = None,
) -> dict[str, Engine]:
    """One engine per kind the models use; a missing llama-server is built (with progress)."""
    from launcher.engines.registry import find_llama_server

    config = loaded.config.engines
    kinds = {model.config.engine_kind for model in models}
    engines: dict[str, Engine] = {}
    if "llama-server" in kinds:
        # no `--version` probe: `lalo up` needs only the path, and a broken binary fails its
        # model's start with the server's own words
        found = find_llama_server(config.llama_server.path, config.llama_server.variant,
                                  probe=lambda binary: None)
        if found is not None:
            engines["llama-server"] = LlamaServerEngine(found.path)
        else:
            announce("no llama-server found: building it from llama.cpp source "
                     "(once; about 8 minutes on 2 cores)")
            builder = build or _build_engine
            engines["llama-server"] = LlamaServerEngine(builder(config.llama_server.variant, announce))
    if "llamafile" in kinds:
        runtime = config.llamafile.runtime
        engines["llamafile"] = LlamafileEngine(
            runtime=Path(runtime).expanduser().resolve() if runtime else None
        )
    if "llama-cpp-python" in kinds:
        python = sys.executable if config.llama_cpp_python.python == "auto" \
            else config.llama_cpp_python.python
        if python == sys.executable:
            import importlib.util

            if importlib.util.find_spec("llama_cpp") is None:
                raise EngineError(
                    "the llama-cpp-python engine is not installed; "
                    "pip install 'lalo-launcher[llama-cpp-python]'"
                )
        engines["llama-cpp-python"] = LlamaCppPythonEngine(python=python)
    return engines


def _build_engine(variant: str, announce: Announce) -> Path:
    from launcher.engines.builder import BuildProgress, build_engine

    last = [-10]

    def progress(report: BuildProgress) -> None:
        if report.percent is None:
            announce(f"  building llama-server: {report.message}")
        elif report.percent >= last[0] + 10 or report.percent == 100:
            last[0] = report.percent
            announce(f"  building llama-server: {report.percent:3d}% {report.message}")

    built = build_engine(variant=variant, progress=progress)
    return built.server


def plan_models(loaded: LoadedConfig, models: Sequence[ResolvedModel], available: int) -> Plan:
    resources = loaded.config.resources
    budget = compute_budget(resources.ram_budget, resources.ram_reserve, available)
    return make_plan([m.candidate() for m in models], budget, resources.max_loaded)


def build_supervisor(
    loaded: LoadedConfig,
    models: Sequence[ResolvedModel],
    engines: dict[str, Engine],
    records: ChildRecords,
    measurements: Measurements,
    share: CpuShare,
    host: str = "127.0.0.1",
) -> tuple[Supervisor, dict[str, Path]]:
    """The supervisor of `models`; `share` decides the OpenMP wait policy of their servers."""
    config = loaded.config
    sup = config.supervisor
    keys: dict[str, str] = {}
    supervisor_ref: list[Supervisor] = []

    def measured(name: str, rss: int) -> None:
        if supervisor_ref:
            supervisor_ref[0].record_measurement(name, rss)

    events = SupervisorEvents(records.add, records.remove, measured)
    entries = []
    log_paths: dict[str, Path] = {}
    for model in models:
        if model.path is None:
            raise StartupError(f"{model.name}: no model file (catalog model not downloaded)")
        cfg = model.config
        keys[model.name] = measurement_key(model.path, cfg.engine_kind, cfg.ctx_size, cfg.parallel)
        settings = ServerSettings(
            model_path=model.path,
            host=host,
            port=0,
            api_key="",
            ctx_size=cfg.ctx_size,
            parallel=cfg.parallel,
            threads=cfg.thread_count,
            embeddings=cfg.embeddings,
            extra_args=(*_alias_args(cfg.engine_kind, model.name), *cfg.args),
            env={**wait_env(share, cfg.env), **cfg.env},
        )
        # sched hook: sleeping and the prompt cache (llama-server only; see supervisor/sleep.py)
        settings, slot_store = sleep_and_prompt_cache(
            model.name, cfg, settings, engines[cfg.engine_kind],
            config.resources.prompt_cache_size, sliding_window=uses_sliding_window(model.info))
        log_path = log_dir() / f"{model.name}.log"
        log_paths[model.name] = log_path
        managed = ManagedModel(
            model.name,
            engines[cfg.engine_kind],
            settings,
            ModelLog(log_path),
            timeouts=Timeouts(
                load_timeout=cfg.load_timeout or sup.load_timeout,
                health_interval=sup.health_interval,
                liveness_timeout=sup.liveness_timeout,
                stop_timeout=sup.stop_timeout,
            ),
            policy=RestartPolicy(
                initial_delay=sup.backoff_initial, max_delay=sup.backoff_max,
                max_failures=sup.max_failures, stable_after=sup.stable_after,
            ),
            events=events,
            sleep_probe=props_sleeping if settings.sleep_after else None,  # sched hook
            prompt_cache=slot_store,  # sched hook
        )
        if slot_store is not None:  # sched hook: the store notes into the model's log
            slot_store.note = managed.log.note
        meta = SupervisedModel(
            name=model.name,
            aliases=tuple(cfg.aliases),
            engine=cfg.engine_kind,
            estimate=model.estimate.total if model.estimate is not None else 0,
            preload=cfg.preload,
            ttl=cfg.ttl,
            path=str(model.path),
            synthetic=bool(model.info and model.info.is_synthetic),
            measurement_key=keys[model.name],
        )
        if model.error is not None:
            managed.mark_invalid(model.error)
        entries.append((meta, managed))
    known = {name: value for name in keys if (value := measurements.get(keys[name])) is not None}
    supervisor = Supervisor(
        entries,
        ram_budget=config.resources.ram_budget,
        ram_reserve=config.resources.ram_reserve,
        max_loaded=config.resources.max_loaded,
        queue_size=config.proxy.queue_size,
        measured=known,
        on_measured=lambda name, rss: measurements.record(keys[name], rss),
    )
    supervisor_ref.append(supervisor)
    return supervisor, log_paths


def _alias_args(engine: str, name: str) -> tuple[str, ...]:
    # llama-server reports this name in its answers instead of the file path
    return ("--alias", name) if engine == "llama-server" else ()


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
    lock = InstanceLock()
    lock.acquire()
    try:
        records = ChildRecords()
        reaped = records.reap_stale()
        if reaped:
            announce(f"stopped {len(reaped)} model server(s) left by a lalo that was killed: "
                     f"pids {', '.join(map(str, reaped))}")
        measurements = Measurements()
        models = with_measurements(resolve_models(loaded, catalog=catalog), measurements)
        plan = plan_models(loaded, models, _available())
        engines = engines_for(loaded, models, announce)
        sock = bind_socket(host, port)
        return await _run(loaded, models, plan, engines, sock, host, port, lock, records,
                          measurements, announce)
    finally:
        lock.release()


def _available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


async def _run(
    loaded: LoadedConfig,
    models: Sequence[ResolvedModel],
    plan: Plan,
    engines: dict[str, Engine],
    sock: socket.socket,
    host: str,
    port: int,
    lock: InstanceLock,
    records: ChildRecords,
    measurements: Measurements,
    announce: Announce,
) -> int:
    config = loaded.config
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    exit_code = [0]

    def on_signal(code: int) -> None:
        exit_code[0] = code
        stop.set()

    with contextlib.suppress(NotImplementedError):  # Windows: KeyboardInterrupt path below
        loop.add_signal_handler(signal.SIGINT, on_signal, EXIT_INTERRUPTED)
        loop.add_signal_handler(signal.SIGTERM, on_signal, 0)

    admin_token = secrets.token_urlsafe(32)
    share = config_share(models, config.resources.max_loaded)
    supervisor, log_paths = build_supervisor(loaded, models, engines, records, measurements,
                                             share, host="127.0.0.1")
    pool: UpstreamPool | None = None
    serving: asyncio.Task[None] | None = None
    server = None
    try:
        # Model servers first: they load while the proxy stack is imported and started.
        preload = [d.name for d in plan.decisions if d.action == "start"]
        loading = asyncio.create_task(_preload(supervisor, preload, announce))
        await _until_spawned(supervisor, preload)
        from launcher.proxy.app import ProxySettings, create_app
        from launcher.proxy.upstream import UpstreamPool

        settings = ProxySettings(
            api_keys=api_keys(config),
            admin_token=admin_token,
            max_body_size=config.proxy.max_body_size,
            upstream_timeout=config.proxy.upstream_timeout,
        )
        # llama-server closes idle connections after 5 s: drop ours first, never reuse a dead one
        pool = UpstreamPool(keepalive_expiry=4.0)
        app = create_app(supervisor, settings, pool, on_shutdown=lambda: on_signal(0),
                         log_paths=log_paths)
        server = _uvicorn_server(app)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        # everything made so far lives until exit: keep it out of the garbage collector's
        # scans, which otherwise stall request handling now and then (the p99 latency)
        gc.freeze()
        while not server.started:
            if serving.done():
                serving.result()
                raise StartupError("the proxy stopped while starting")
            await asyncio.sleep(0.01)
        url = f"http://{_display_host(host)}:{port}"
        me = os.getpid()
        lock.publish(InstanceInfo(
            pid=me, created=platform.create_time(me) or time.time(), url=url,
            started_at=time.time(), admin_token=admin_token,
            config=loaded.describe_source(), version=__version__, log_dir=str(log_dir()),
        ))
        announce(f"lalo {__version__} serving {url}  (dashboard {url}/, OpenAI API {url}/v1)")
        announce(f"config: {loaded.describe_source()}; RAM budget {format_size(plan.budget.bytes)} "
                 f"({plan.budget.source})")
        if share.oversubscribed:
            announce(f"cpu: {policy_line(share)}")
        for model in models:
            if model.info is not None and model.info.is_synthetic:
                announce(f"  {model.name}: random-weight demo model (it answers with noise, not text)")
        supervisor.start_background()
        for decision in plan.decisions:
            if decision.action != "start":
                announce(f"  {decision.name}: {decision.action}: {decision.reason}")
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({stopped, serving}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done() and not stop.is_set():
            serving.result()
            raise StartupError("the proxy stopped unexpectedly")
        announce("stopping: no new requests; stopping model servers")
        loading.cancel()
        server.should_exit = True
        await supervisor.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(serving, 10)
        announce("stopped")
        return exit_code[0]
    finally:
        if serving is not None and not serving.done():
            if server is not None:
                server.force_exit = True
            serving.cancel()
            with contextlib.suppress(BaseException):
                await serving
        await supervisor.close()
        if pool is not None:
            await pool.aclose()
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)


async def _until_spawned(supervisor: Supervisor, names: Sequence[str], limit: float = 2.0) -> None:
    """Give the preload starts the loop until each has spawned its process (or failed)."""
    waits = [asyncio.ensure_future(supervisor.models[name].spawned.wait()) for name in names]
    if waits:
        _, pending = await asyncio.wait(waits, timeout=limit)
        for wait in pending:
            wait.cancel()


def _uvicorn_server(app: Any) -> Any:
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
        timeout_graceful_shutdown=5, loop="none", ws="none", log_config=None,
        timeout_keep_alive=CLIENT_KEEPALIVE_S,
    ))


async def _preload(supervisor: Supervisor, names: Sequence[str], announce: Announce) -> None:
    if not names:
        return
    started = time.monotonic()
    announce(f"starting {len(names)} model server(s): {', '.join(names)}")

    async def one(name: str) -> None:
        try:
            endpoint = await supervisor.load(name)
        except LaloError as exc:
            announce(f"  {name}: FAILED: {exc}")
            return
        model = supervisor.models[name]
        announce(f"  {name}: ready in {time.monotonic() - started:.1f} s "
                 f"(pid {endpoint.pid}, port {model.port})")

    await asyncio.gather(*(one(name) for name in names))


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
