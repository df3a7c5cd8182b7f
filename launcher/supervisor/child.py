"""A spawned model server process: readiness and health probes that race its exit, its
output into the model's log, its teardown (TERM, wait, KILL the group), and why it went (an
exit, a hang, a kill for memory)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from launcher.engines.base import LaunchSpec
from launcher.machine.limits import OomKills
from launcher.supervisor import platform
from launcher.supervisor.logs import ModelLog
from launcher.supervisor.probe import Probe, ProbeError
from launcher.supervisor.state import Timeouts
from launcher.units import format_size

_LOG_LINES_IN_ERRORS = 8


async def until_ready(process: asyncio.subprocess.Process, spec: LaunchSpec, api_key: str,
                      probe: Probe, timeouts: Timeouts) -> int | None:
    """Race readiness against the process's exit, for load_timeout: None once it answers
    ready, else its exit code; TimeoutError when neither happened in time (it still runs)."""
    exited = asyncio.ensure_future(process.wait())
    ready = asyncio.ensure_future(_poll_ready(spec, api_key, probe, timeouts.probe_interval))
    try:
        done, _ = await asyncio.wait({exited, ready}, timeout=timeouts.load_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        exited.cancel()
        raise
    finally:
        ready.cancel()
    if ready in done and not ready.cancelled() and ready.exception() is None:
        exited.cancel()
        return None
    if exited in done:
        return exited.result()
    exited.cancel()
    raise TimeoutError


async def _poll_ready(spec: LaunchSpec, api_key: str, probe: Probe, interval: float) -> None:
    url = spec.base_url + spec.ready_path
    headers = {"Authorization": f"Bearer {api_key}"}
    while True:
        try:
            if await probe(url, headers, 2.0) == 200:
                return
        except ProbeError:
            pass
        await asyncio.sleep(interval)


async def healthy(spec: LaunchSpec, api_key: str, probe: Probe, timeouts: Timeouts) -> bool:
    headers = {"Authorization": f"Bearer {api_key}"} if spec.health_needs_key else {}
    try:
        status = await probe(spec.base_url + spec.health_path, headers,
                             min(timeouts.liveness_timeout, 5.0))
    except ProbeError:
        return False
    return status == 200


@dataclass(frozen=True)
class Exit:
    """Why a ready server is gone: `code` is its exit status when it ended (or was killed)
    without lalo's doing; None when lalo killed it (a hang)."""

    reason: str
    code: int | None

    @property
    def killed_from_outside(self) -> bool:
        """SIGKILL that lalo did not send (it sends one only to a hung server, or at a stop,
        which ends the watch first): the kernel's out-of-memory killer, most likely."""
        return self.code == -signal.SIGKILL


def memory_kill(reached: int | None, kills_before: OomKills | None,
                kills_after: OomKills | None) -> str:
    """What a kill from outside is called: by the container's limit when its cgroup's count of
    out-of-memory kills rose meanwhile, else most likely for memory (the OOM killer)."""
    # the signal is named too: someone's `kill -9` looks the same
    figure = (f": it had reached {format_size(reached)}" if reached else "") + " (SIGKILL)"
    if (kills_before is not None and kills_after is not None
            and kills_after.count > kills_before.count):
        if kills_after.limit is not None:
            return (f"killed by the memory limit of this container "
                    f"({format_size(kills_after.limit)}){figure}")
        return f"killed by the kernel's out-of-memory killer{figure}"
    return f"killed, most likely for memory{figure}"


async def watch(process: asyncio.subprocess.Process, spec: LaunchSpec, timeouts: Timeouts,
                is_healthy: Callable[[], Awaitable[bool]],
                while_healthy: Callable[[], Awaitable[None]],
                clock: Callable[[], float], log: ModelLog) -> Exit:
    """Race the process's exit against periodic health checks until it is gone; one that
    does not answer for liveness_timeout is hung and killed. Returns why it is gone."""
    exited = asyncio.ensure_future(process.wait())
    last_ok = clock()
    try:
        while True:
            done, _ = await asyncio.wait({exited}, timeout=timeouts.health_interval)
            if exited in done:
                code = exited.result()
                return Exit(f"server exited ({describe_exit(code)})", code)
            if await is_healthy():
                last_ok = clock()
                await while_healthy()
            elif clock() - last_ok >= timeouts.liveness_timeout:
                reason = (f"no answer to {spec.health_path} for "
                          f"{timeouts.liveness_timeout:g} s (hung); killed")
                log.note(reason)
                platform.stop_signal_continue(process.pid)
                platform.kill_group(process.pid)
                await exited
                return Exit(reason, None)
    finally:
        if not exited.done():
            exited.cancel()


async def terminate(process: asyncio.subprocess.Process, stop_timeout: float,
                    log: ModelLog) -> None:
    """TERM the group, wait stop_timeout, KILL the group; then its stragglers (a llamafile's
    children) go too."""
    if process.returncode is None:
        platform.stop_signal_continue(process.pid)
        platform.terminate_group(process.pid)
        try:
            async with asyncio.timeout(stop_timeout):
                await asyncio.shield(process.wait())
        except TimeoutError:
            log.note(f"no exit {stop_timeout:g} s after SIGTERM; killing")
            platform.kill_group(process.pid)
            await process.wait()
    platform.kill_group(process.pid)


async def read_output(stream: asyncio.StreamReader, log: ModelLog) -> None:
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return
        log.write(chunk)


def log_excerpt(log: ModelLog) -> str:
    """The server's last log lines, for an error message."""
    lines = [line for line in log.last_lines(40) if not line.startswith("--- lalo:")]
    lines = lines[-_LOG_LINES_IN_ERRORS:]
    return ("\n" + "\n".join("  | " + line for line in lines)) if lines else ""


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
