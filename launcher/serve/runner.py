"""`lalo up`: config -> plan -> engines -> model servers + proxy on one event loop; staged shutdown.

Signal handlers only record the signal; the main coroutine acts on it: stop accepting, let
the requests in flight finish (within `stop_timeout`), then stop every model server (TERM,
wait, KILL the group), release the instance lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Collection, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher import __version__, paths
from launcher.config import ApiKey, Config, LoadedConfig
from launcher.engines.base import Engine, ServerSettings
from launcher.engines.llama_cpp_python import LlamaCppPythonEngine
from launcher.engines.llama_server import LlamaServerEngine
from launcher.engines.llamafile import LlamafileEngine
from launcher.errors import EngineError, LaloError, StartupError
from launcher.machine.memory import system_memory
from launcher.placement.context import fit_contexts
from launcher.placement.cpu_share import CpuShare, config_share, policy_line, quota_threads, wait_env
from launcher.placement.estimate import MemorySettings
from launcher.placement.gpu_offload import NO_GPU, Offload, machine_offload
from launcher.placement.measurements import Measurements, measurement_key, with_measurements
from launcher.placement.planner import Plan, compute_budget, make_plan
from launcher.placement.resolve import ResolvedModel, resolve_models
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
    from launcher.engines.cmake import CommandRunner
    from launcher.engines.progress import StatusOutput
    from launcher.models.catalog import CatalogResolver
    from launcher.proxy.peers import PeerTable
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


def api_keys(config: Config) -> tuple[ApiKey, ...]:
    """Configured keys plus $LALO_API_KEYS (comma separated; admin keys named env1, env2...)."""
    extra = [key.strip() for key in os.environ.get("LALO_API_KEYS", "").split(",") if key.strip()]
    known = {entry.key for entry in config.proxy.api_keys}
    taken = {entry.name for entry in config.proxy.api_keys}
    names = (f"env{n}" for n in range(1, 10_000) if f"env{n}" not in taken)
    added = [ApiKey(key=key, name=next(names))
             for key in dict.fromkeys(k for k in extra if k not in known)]
    return (*config.proxy.api_keys, *added)


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
    return build_llama_server(variant, LinesOnly(announce))


def llama_server_missing(config: Config, kinds: Collection[str] | None = None) -> bool:
    """True when a model needs llama-server and none is found (`lalo up` then builds one);
    `kinds`: the engine kinds its models use (default: those of `config`'s models)."""
    from launcher.engines.registry import find_llama_server

    if kinds is None:
        kinds = {model.engine_kind for model in config.models.values()}
    if "llama-server" not in kinds:
        return False
    settings = config.engines.llama_server
    return find_llama_server(settings.path, settings.variant, probe=lambda binary: None) is None


def build_llama_server(variant: str, out: StatusOutput, runner: CommandRunner | None = None) -> Path:
    """Build llama-server (`lalo up` on a first run) with its progress on `out`, each line
    starting `engine:`; `runner` runs cmake (a CancellableRunner when other work overlaps)."""
    from launcher.engines.builder import EngineBuilder
    from launcher.engines.cmake import run_command
    from launcher.engines.progress import BuildProgressView, duration

    view = BuildProgressView(out, label="engine: ")
    started = time.monotonic()
    try:
        built = EngineBuilder(runner=runner or run_command).build(variant, progress=view)
    finally:
        view.close()
    if not built.already_built:  # another lalo may have built it meanwhile
        out.line(f"engine: built {built.key} in {duration(time.monotonic() - started)}")
    return built.server


class LinesOnly:
    """A StatusOutput of whole lines only (no status line): what an `announce` function gives."""

    interactive = False

    def __init__(self, say: Announce) -> None:
        self._say = say

    def line(self, text: str) -> None:
        self._say(text)

    def status(self, text: str) -> None:
        pass

    def clear_status(self) -> None:
        pass


def plan_models(loaded: LoadedConfig, models: Sequence[ResolvedModel], available: int,
                limit_note: str | None = None) -> Plan:
    resources = loaded.config.resources
    budget = compute_budget(resources.ram_budget, resources.ram_reserve, available, limit_note)
    return make_plan([m.candidate() for m in models], budget, resources.max_loaded)


@dataclass(frozen=True)
class ServerFactory:
    """Makes the ManagedModel (and its facts and restart policy) of one resolved model."""

    loaded: LoadedConfig
    engines: dict[str, Engine]
    events: SupervisorEvents  # the supervisor's: each model gets its share
    share: CpuShare
    host: str = "127.0.0.1"
    # each model's -ngl / --tensor-split (launcher.placement.gpu_offload); none by default
    offload: Offload = dataclasses.field(default_factory=Offload)

    def make(self, model: ResolvedModel) -> tuple[SupervisedModel, ManagedModel, RestartPolicy]:
        sup = self.loaded.config.supervisor
        cfg = model.config
        # a model without a file (a catalog model that could not be pulled) is failed with its
        # reason; the others are served
        path = model.path if model.path is not None else Path(cfg.file or cfg.catalog or model.name)
        settings = ServerSettings(
            model_path=path,
            host=self.host,
            port=0,
            api_key="",
            ctx_size=cfg.ctx_size,
            parallel=cfg.parallel,
            threads=cfg.thread_count or quota_threads(),
            embeddings=cfg.embeddings,
            chat_template=self.loaded.chat_template(model.name),
            extra_args=(*_alias_args(cfg.engine_kind, model.name), *cfg.args),
            kv_cache=cfg.kv_cache,
            env={**wait_env(self.share, cfg.env), **cfg.env},
        )
        settings = self.offload.server_settings(model.name, settings)
        # sleeping when idle and the prompt cache kept across stops (llama-server only);
        # this also drops slot files of an older model file, engine or setting
        model_log = ModelLog(log_dir() / f"{model.name}.log")
        settings, slot_store = sleep_and_prompt_cache(
            model.name, cfg, settings, self.engines[cfg.engine_kind],
            self.loaded.config.resources.prompt_cache_size,
            sliding_window=uses_sliding_window(model.info), note=model_log.note)
        key = self.offload.measurement_key(
            model.name, measurement_key(path, cfg.engine_kind, cfg.ctx_size, cfg.parallel,
                                        MemorySettings.of(cfg).key()))
        managed = ManagedModel(
            model.name,
            self.engines[cfg.engine_kind],
            settings,
            model_log,
            timeouts=Timeouts(
                load_timeout=cfg.load_timeout or sup.load_timeout,
                health_interval=sup.health_interval,
                liveness_timeout=sup.liveness_timeout,
                stop_timeout=sup.stop_timeout,
            ),
            events=self.events.for_model(model.name, key),
            sleep_probe=props_sleeping if settings.sleep_after else None,
            prompt_cache=slot_store,
        )
        policy = RestartPolicy(
            initial_delay=sup.backoff_initial, max_delay=sup.backoff_max,
            max_failures=sup.max_failures, stable_after=sup.stable_after,
        )
        meta = SupervisedModel(
            name=model.name,
            aliases=tuple(cfg.aliases),
            engine=cfg.engine_kind,
            estimate=model.estimate.total if model.estimate is not None else 0,
            preload=cfg.preload,
            ttl=cfg.ttl,
            path=str(path),
            synthetic=bool(model.info and model.info.is_synthetic),
            measurement_key=key,
            pinned=cfg.pinned,
            ctx_size=cfg.ctx_size, parallel=cfg.parallel, kv_cache=cfg.kv_cache,
            request_rules=cfg.request_rules or None,
        )
        if model.error is not None:
            managed.mark_invalid(model.error)
        return meta, managed, policy


def build_supervisor(
    loaded: LoadedConfig,
    models: Sequence[ResolvedModel],
    engines: dict[str, Engine],
    records: ChildRecords,
    measurements: Measurements,
    share: CpuShare,
    host: str = "127.0.0.1",
    offload: Offload = NO_GPU,
) -> Supervisor:
    """The supervisor of `models`; `share` decides the OpenMP wait policy of their servers."""
    config = loaded.config
    events = SupervisorEvents(records, measurements)
    factory = ServerFactory(loaded, engines, events, share, host, offload)
    made = [factory.make(model) for model in models]
    keys = {meta.name: meta.measurement_key for meta, _, _ in made}
    known = {name: value for name in keys if (value := measurements.get(keys[name])) is not None}
    supervisor = Supervisor(
        [(meta, managed) for meta, managed, _ in made],
        ram_budget=config.resources.ram_budget,
        ram_reserve=config.resources.ram_reserve,
        max_loaded=config.resources.max_loaded,
        queue_size=config.proxy.queue_size,
        max_wait=config.resources.max_wait,
        wait_timeout=config.proxy.upstream_timeout,
        drain_timeout=config.proxy.upstream_timeout,
        policies={meta.name: policy for meta, _, policy in made},
        measured=known,
        events=events,
    )
    return supervisor


class Reloader:
    """`lalo reload`, SIGHUP, `POST /api/reload`: re-read lalo.yaml and apply what changed.

    A config that does not load changes nothing (the reason is the one line `lalo up` would
    print). Otherwise only models whose settings changed are drained and restarted, new ones
    are added (started if `preload`), removed ones are drained and stopped; the servers of
    unchanged models keep running (same pid).
    """

    def __init__(self, loaded: LoadedConfig, models: Sequence[ResolvedModel],
                 supervisor: Supervisor, factory: ServerFactory, measurements: Measurements,
                 announce: Announce, ctx_budget: int = 0) -> None:
        self.loaded = loaded
        self.models = {model.name: model for model in models}
        self.ctx_budget = ctx_budget  # the budget `ctx_size: auto` models were fitted in at start
        self.supervisor = supervisor
        self.factory = factory
        self.measurements = measurements
        self.announce = announce
        self._lock = asyncio.Lock()

    async def reload(self) -> dict[str, Any]:
        async with self._lock:
            try:
                loaded, models, offload = self._read()
            except LaloError as exc:
                self.announce(f"reload: {exc}; nothing changed")
                return {"status": "error", "error": str(exc)}
            new = {model.name: model for model in models}
            removed = [name for name in self.models if name not in new]
            added = [name for name in new if name not in self.models]
            old_offload = self.factory.offload
            changed = [name for name in new if name in self.models
                       and (_settings(self.models[name]) != _settings(new[name])
                            or old_offload.assignment(name) != offload.assignment(name))]
            unchanged = [name for name in new if name not in added and name not in changed]
            factory = dataclasses.replace(self.factory, loaded=loaded, offload=offload)
            resources = loaded.config.resources
            await self.supervisor.reconfigure(
                replace=[factory.make(new[name]) for name in (*changed, *added)],
                remove=removed,
                max_loaded=resources.max_loaded, max_wait=resources.max_wait,
                ram_budget=resources.ram_budget, ram_reserve=resources.ram_reserve,
            )
            previous_peers = self.loaded.config.peers
            self.loaded, self.models, self.factory = loaded, new, factory
            summary: dict[str, Any] = {
                "status": "ok", "unchanged": unchanged, "restarted": changed,
                "added": added, "removed": removed}
            parts = [f"{key} {', '.join(names)}" for key, names in summary.items()
                     if key != "status" and key != "unchanged" and names]
            if loaded.config.peers != previous_peers:  # read once, at `lalo up`
                summary["peers"] = "changed in the file but not applied: restart lalo for peers"
                parts.append(f"peers {summary['peers']}")
            self.announce("reload: " + ("; ".join(parts) if parts else "no model changed"))
            return summary

    def _read(self) -> tuple[LoadedConfig, list[ResolvedModel], Offload]:
        from launcher.config import load_config
        from launcher.placement.resolve import catalog_for

        if self.loaded.source is None:
            raise StartupError("lalo runs the built-in default config: there is no file to reload")
        loaded = load_config(self.loaded.source)
        missing = {m.engine_kind for m in loaded.config.models.values()} - set(self.factory.engines)
        if missing:
            raise EngineError(f"reload cannot add an engine lalo did not start with "
                              f"({', '.join(sorted(missing))}); restart lalo")
        models = fit_contexts(resolve_models(loaded, catalog=catalog_for(loaded)), self.ctx_budget,
                              keep=self._kept_contexts(loaded))
        models = usable_models(with_measurements(models, self.measurements))
        offload = self.factory.offload.replan(models)
        return loaded, offload.apply(models, self.measurements), offload


    def _kept_contexts(self, loaded: LoadedConfig) -> dict[str, int]:
        """`ctx_size: auto` models whose settings did not change keep their context: the RAM
        their servers hold is not free now, so fitting again would shrink them."""
        kept = {}
        for name, old in self.models.items():
            new = loaded.config.models.get(name)
            if (old.config.ctx_auto and new is not None
                    and new.model_copy(update={"ctx_size": old.config.ctx_size}) == old.config):
                kept[name] = old.config.ctx_size
        return kept


def _settings(model: ResolvedModel) -> tuple[object, ...]:
    """What a model's server is started from: equal means its server can stay."""
    return (model.config, model.path, model.error)


def usable_models(models: Sequence[ResolvedModel]) -> list[ResolvedModel]:
    """Models without a file become failed with the command that fixes it; StartupError when
    no model at all can be served (one model's trouble is its own)."""
    out: list[ResolvedModel] = []
    for model in models:
        if model.path is None and model.error is None:
            entry = model.config.catalog
            model = dataclasses.replace(model, error=(
                f"catalog model {entry!r} is not downloaded and could not be pulled; "
                f"run `lalo models pull {entry}` where the hub is reachable"))
        out.append(model)
    if out and all(m.error is not None for m in out):
        raise StartupError("no model can be served:\n" + "\n".join(
            f"  {m.name}: {m.error}" for m in out))
    return out


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
        resources = config.resources
        memory = system_memory()
        ctx_budget = compute_budget(resources.ram_budget, resources.ram_reserve, memory.available).bytes
        models = fit_contexts(resolve_models(loaded, catalog=catalog), ctx_budget)
        models = usable_models(with_measurements(models, measurements))
        # on a GPU machine: each model's layers per GPU, and only its RAM part in the budget
        offload = machine_offload(loaded, models, memory.available)
        models = offload.apply(models, measurements)
        plan = plan_models(loaded, models, memory.available, memory.limit_note())
        engines = engines_for(loaded, models, announce)
        sock = bind_socket(host, port)
        return await _run(loaded, models, plan, engines, sock, host, port, lock, records,
                          measurements, announce, peers, offload)
    finally:
        lock.release()


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
    peers: PeerTable | None = None,
    offload: Offload = NO_GPU,
) -> int:
    config = loaded.config
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    exit_code = [0]

    uvicorn_server: list[Any] = []  # set once the proxy runs

    def on_signal(code: int) -> None:
        if stop.is_set() and uvicorn_server:
            uvicorn_server[0].force_exit = True  # a second Ctrl+C: do not wait for requests
        exit_code[0] = code
        stop.set()

    with contextlib.suppress(NotImplementedError):  # Windows: KeyboardInterrupt path below
        loop.add_signal_handler(signal.SIGINT, on_signal, EXIT_INTERRUPTED)
        loop.add_signal_handler(signal.SIGTERM, on_signal, 0)

    admin_token = secrets.token_urlsafe(32)
    share = config_share(models, config.resources.max_loaded)
    supervisor = build_supervisor(loaded, models, engines, records, measurements,
                                             share, host="127.0.0.1", offload=offload)
    reloader = Reloader(loaded, models, supervisor,
                        ServerFactory(loaded, engines, supervisor.events, share, "127.0.0.1",
                                      offload),
                        measurements, announce, ctx_budget=plan.budget.bytes)
    reloads: set[asyncio.Task[Any]] = set()

    def on_hangup() -> None:
        task = loop.create_task(reloader.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    if hasattr(signal, "SIGHUP"):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, on_hangup)
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
            listen_host=host,
            allowed_hosts=config.proxy.allowed_hosts,
            cors_origins=config.proxy.cors_origins,
            activity=config.proxy.activity,
            capture_own_log=True,
        )
        # llama-server closes idle connections after 5 s: drop ours first, never reuse a dead one
        pool = UpstreamPool(keepalive_expiry=4.0)
        app = create_app(supervisor, settings, pool, on_shutdown=lambda: on_signal(0),
                         on_reload=reloader.reload, peers=peers,
                         closing=stop)
        server = _uvicorn_server(app, config.supervisor.stop_timeout)
        uvicorn_server.append(server)
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
        for line in offload.lines():
            announce(line)
        for model in models:
            if model.info is not None and model.info.is_synthetic:
                announce(f"  {model.name}: random-weight demo model (it answers with noise, not text)")
        supervisor.start_background()
        if peers:
            peers.start()
            announce(f"peers: {', '.join(f'{n} ({p.config.url})' for n, p in peers.peers.items())}")
        for decision in plan.decisions:
            if decision.action != "start":
                announce(f"  {decision.name}: {decision.action}: {decision.reason}")
            if decision.ctx_note:
                announce(f"  {decision.name}: {decision.ctx_note}")
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({stopped, serving}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done() and not stop.is_set():
            serving.result()
            raise StartupError("the proxy stopped unexpectedly")
        # stop accepting, let the requests in flight finish (uvicorn waits up to
        # stop_timeout), and only then stop the model servers they are talking to
        busy = sum(row["in_flight"] for row in supervisor.status())
        announce("stopping: no new requests"
                 + (f"; letting {busy} request(s) in flight finish (Ctrl+C again: at once)"
                    if busy else ""))
        loading.cancel()
        server.should_exit = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(config.supervisor.stop_timeout + 5):
                await asyncio.shield(serving)
        # requests still running (a second Ctrl+C) are ended here, their upstream connections
        # closed, so that each model server stops its generation and exits at once
        leftover = [task for task in server.server_state.tasks if not task.done()]
        for task in leftover:
            task.cancel()
        if leftover:
            await asyncio.wait(leftover, timeout=5)
        announce("stopping model servers")
        await supervisor.close()
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
        if peers is not None:
            await peers.close()
        if pool is not None:
            await pool.aclose()
        for task in list(reloads):
            task.cancel()
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)
            loop.remove_signal_handler(signal.SIGHUP)


async def _until_spawned(supervisor: Supervisor, names: Sequence[str], limit: float = 2.0) -> None:
    """Give the preload starts the loop until each has spawned its process (or failed)."""
    waits = [asyncio.ensure_future(supervisor.models[name].spawned.wait()) for name in names]
    if waits:
        _, pending = await asyncio.wait(waits, timeout=limit)
        for wait in pending:
            wait.cancel()


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
