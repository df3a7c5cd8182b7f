"""One model server process and its lifecycle: start, stop, and what it tells its owner.

A ManagedModel never decides *when* to start: the supervisor does (first loads, on-demand
loads and restarts after a crash all pass its admission). It starts the process when told,
watches it, and tells its events (given at construction) the moment the process exits or
hangs. The states and the transitions allowed between them are `launcher.supervisor.state`;
spawning, probing and stopping a process are `launcher.supervisor.child`.

`sleeping` is reported (`reported_state`), learnt from the health checks; everything else
treats the model as ready (a request wakes it). A server killed with a SIGKILL lalo did not
send is reported as killed for memory, with the RSS it had reached (`child.memory_kill`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from launcher.engines.base import Engine, LaunchSpec, ServerSettings
from launcher.errors import (
    EngineError,
    ModelStartError,
    ModelStoppedError,
)
from launcher.machine.limits import OomKills, current_oom_kills
from launcher.supervisor import child, platform
from launcher.supervisor.events import NO_EVENTS, ProcessEvents
from launcher.supervisor.logs import ModelLog
from launcher.supervisor.probe import Probe, http_status
from launcher.supervisor.prompt_cache import SlotStore
from launcher.supervisor.sleep import SleepProbe
from launcher.supervisor.state import Endpoint, EndpointGone, ModelState, Timeouts, check_transition
from launcher.supervisor.tasks import Tasks

__all__ = ["Endpoint", "ManagedModel", "ModelState", "PortAllocator", "ProcessEvents", "Spawner",
           "Timeouts"]

log = logging.getLogger(__name__)

Spawner = Callable[[LaunchSpec], Awaitable[asyncio.subprocess.Process]]
PortAllocator = Callable[[str], int]
_PORT_RETRIES = 3


async def _default_spawner(spec: LaunchSpec) -> asyncio.subprocess.Process:
    return await platform.spawn(spec.argv, spec.env)


class ManagedModel:
    """Owns one model server process and its state; all methods run on the event loop."""

    def __init__(
        self,
        name: str,
        engine: Engine,
        settings: ServerSettings,
        log_sink: ModelLog,
        *,
        probe: Probe = http_status,
        timeouts: Timeouts = Timeouts(),
        events: ProcessEvents = NO_EVENTS,  # what it tells (its supervisor's for_model())
        spawner: Spawner = _default_spawner,
        port_allocator: PortAllocator = platform.free_port,
        clock: Callable[[], float] = time.monotonic,
        sleep_probe: SleepProbe | None = None,  # learns `sleeping`
        prompt_cache: SlotStore | None = None,  # slot save on stop, restore on start
        oom_kills: Callable[[], OomKills | None] = current_oom_kills,  # lalo's cgroup's count
    ) -> None:
        self.name = name
        self.engine = engine
        self.settings = settings
        self.log = log_sink
        self.timeouts = timeouts
        self._probe = probe
        self._events = events
        self._spawner = spawner
        self._ports = port_allocator
        self._clock = clock
        self._sleep_probe = sleep_probe
        self._prompt_cache = prompt_cache
        self._oom_kills = oom_kills
        self._oom_kills_at_ready: OomKills | None = None
        self._asleep = False  # the server said it sleeps (only while READY)
        self._waking_until: float | None = None  # a wake under way (see mark_awake)

        self._state = ModelState.STOPPED
        self._process: asyncio.subprocess.Process | None = None
        self._endpoint: Endpoint | None = None
        self._gone = EndpointGone()  # set once the current endpoint is no longer served
        self._gone.set()
        self._spec: LaunchSpec | None = None
        self._outcome: asyncio.Future[Endpoint] | None = None  # the start under way
        self._tasks = Tasks(name)
        self._start_task: asyncio.Task[None] | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._stopped.set()
        # set once a start attempt has a process (or has failed): lets `lalo up` start the
        # proxy while model servers load
        self.spawned = asyncio.Event()

        self.started_at: float | None = None  # clock() when it became ready
        self.ready_at_wall: float | None = None
        self.last_error: str | None = None
        self.rss: int | None = None
        self.rss_peak: int | None = None
        self.run_peak: int | None = None  # the current (or last) run's highest RSS sampled
        self.last_exit: str | None = None  # why the last ready server went without being stopped
        self.memory_reached: int | None = None  # RSS it had reached when killed for memory
        self.load_seconds: float | None = None
        self.spawn_count = 0

    # --- reading ------------------------------------------------------------------------------
    @property
    def events(self) -> ProcessEvents:
        """What it tells, given at construction."""
        return self._events

    @property
    def state(self) -> ModelState:
        """The lifecycle state the owner acts on: a sleeping server is `ready` (a request wakes it)."""
        return self._state

    @property
    def asleep(self) -> bool:
        return self._state == ModelState.READY and self._asleep

    @property
    def reported_state(self) -> ModelState:
        """What status shows: `sleeping` while the server has freed its weights."""
        return ModelState.SLEEPING if self.asleep else self._state

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def port(self) -> int | None:
        return self.settings.port if self._process is not None else None

    @property
    def endpoint(self) -> Endpoint | None:
        return self._endpoint if self._state == ModelState.READY else None

    @property
    def gone(self) -> EndpointGone:
        """Set the moment the current endpoint stops being served (exit, hang, stop), with the
        reason of an exit; a lease holds the one of the endpoint it was granted."""
        return self._gone

    def _drop_endpoint(self, reason: str | None = None) -> None:
        self._endpoint = None
        self._gone.withdraw(reason)

    def uptime(self) -> float | None:
        if self._state != ModelState.READY or self.started_at is None:
            return None
        return self._clock() - self.started_at

    def not_restarted(self, why: str) -> None:
        """The supervisor will not restart it (`why`: it cannot fit): failed, saying so."""
        self.last_error = f"{self.last_exit or self.last_error}; not restarted: {why}"
        self.log.note(f"not restarted: {why}")

    def mark_invalid(self, reason: str) -> None:
        """A model that must not be started (its file is unusable): failed until a restart."""
        self.last_error = reason
        self.log.note(f"not started: {reason}")
        self._set_state(ModelState.FAILED)

    # --- starting and stopping ------------------------------------------------------------------
    async def start(self) -> Endpoint:
        """Start the server (from stopped or failed) and wait until it is ready.

        Raises ModelStartError (with the server's last log lines) when it exits or is not
        ready within `load_timeout`, ModelStoppedError when `stop()` ends the start. Callers
        that come while a start is under way share it; a ready server returns at once.
        """
        while True:
            if self._state == ModelState.READY and self._endpoint is not None:
                return self._endpoint
            if self._state == ModelState.STOPPING:
                await self._stopped.wait()
                continue
            if self._state != ModelState.STARTING and self._health_task is not None:
                # a server that just died is still being reaped: let that finish first
                await asyncio.wait({self._health_task})
                continue
            break
        if self._state != ModelState.STARTING:
            self._outcome = asyncio.get_running_loop().create_future()
            self._outcome.add_done_callback(_consume_exception)
            self._set_state(ModelState.STARTING)
            self._start_task = self._tasks.spawn(self._start(self._outcome), "start")
        assert self._outcome is not None
        return await asyncio.shield(self._outcome)

    async def ensure_ready(self) -> Endpoint:
        """`start()` for code that runs one model without a supervisor (speed tests)."""
        return await self.start()

    async def wait_stopped(self) -> None:
        """Returns at once unless a stop is under way; then when it is done."""
        await self._stopped.wait()

    async def stop(self, reason: str = "stop requested") -> None:
        """Stop the server (TERM, wait, KILL the group) and wait until it has exited. Safe twice."""
        if self._state == ModelState.STOPPED:
            return
        if self._state == ModelState.STOPPING:
            await self._stopped.wait()
            return
        # an awake ready server's cached prompts are saved before it goes
        save_to = self._endpoint if self._state == ModelState.READY and not self._asleep else None
        self._set_state(ModelState.STOPPING)
        self._stopped.clear()
        try:
            self.log.note(f"stopping: {reason}")
            tasks = [t for t in (self._start_task, self._health_task) if t]
            for task in tasks:
                self._cancel(task)
            # let them unwind first: a start cancelled mid-spawn still hands over its process
            if tasks:
                await asyncio.wait(tasks)
            self._start_task = self._health_task = None
            self._fail_outcome(ModelStoppedError(f"{self.name}: stopped ({reason})"))
            if save_to is not None and self._prompt_cache is not None:
                try:
                    await self._prompt_cache.save(save_to.base_url, save_to.api_key)
                except Exception:  # never fails a stop; the store logs its own expected errors
                    log.exception("%s: prompt cache save", self.name)
            await self._terminate()
        finally:
            self._drop_endpoint()
            self._set_state(ModelState.STOPPED)
            self._stopped.set()

    async def close(self) -> None:
        await self.stop("lalo is shutting down")
        await self._tasks.close()
        self.log.close()

    async def _start(self, outcome: asyncio.Future[Endpoint]) -> None:
        try:
            endpoint = await self._start_attempts()
        except (ModelStartError, EngineError, OSError) as exc:
            self._start_task = None
            self._drop_endpoint()
            self.spawned.set()
            reason = str(exc)
            self.last_error = reason
            self.log.note(f"failed: {reason.splitlines()[0]}")
            log.warning("%s", reason.splitlines()[0])
            self._set_state(ModelState.FAILED)
            if not outcome.done():
                outcome.set_exception(
                    exc if isinstance(exc, ModelStartError) else ModelStartError(reason))
            return
        self._start_task = None
        if self._prompt_cache is not None:  # restore before anyone can lease it
            try:
                await self._prompt_cache.restore(endpoint.base_url, endpoint.api_key)
            except Exception:  # never fails a start; the store logs its own expected errors
                log.exception("%s: prompt cache restore", self.name)
        self.started_at = self._clock()
        self.ready_at_wall = time.time()
        self._endpoint = endpoint
        self._gone = EndpointGone()
        self.run_peak = None
        self._oom_kills_at_ready = self._oom_kills()
        self._set_state(ModelState.READY)
        self.log.note(f"ready on {endpoint.base_url} (pid {endpoint.pid}) in {self.load_seconds:.2f} s")
        self._sample_memory()
        self._health_task = self._tasks.spawn(self._watch(), "health")
        if not outcome.done():
            outcome.set_result(endpoint)

    async def _start_attempts(self) -> Endpoint:
        """Spawn and wait for readiness; a port someone else took is retried on a fresh port."""
        for attempt in range(_PORT_RETRIES):
            port = self._ports(self.settings.host)
            self.settings = dataclasses.replace(
                self.settings, port=port, api_key=secrets.token_urlsafe(24)
            )
            try:
                return await self._start_once()
            except ModelStartError:
                if attempt + 1 < _PORT_RETRIES and platform.port_in_use(self.settings.host, port):
                    self.log.note(f"port {port} was taken by another process; trying another port")
                    continue
                raise
        raise AssertionError("unreachable")

    async def _start_once(self) -> Endpoint:
        spec = self.engine.launch_spec(self.settings)
        self._spec = spec
        began = self._clock()
        self.log.new_run()
        if self._prompt_cache is not None and not self._prompt_cache.ensure():
            # llama-server refuses a --slot-save-path that is not a directory
            raise ModelStartError(f"{self.name}: the prompt cache folder "
                                  f"{self._prompt_cache.directory} cannot be made")
        self.log.note("starting: " + " ".join(spec.argv))
        spawning = asyncio.ensure_future(self._spawner(spec))
        try:
            process = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            # finish spawning so that whoever cancelled us can stop the process: no orphan
            with contextlib.suppress(Exception):
                self._process = await spawning
            raise
        self.spawn_count += 1
        self._process = process
        self.spawned.set()
        created = platform.create_time(process.pid) or time.time()
        self._events.spawned(process.pid, created, self.settings.port)
        if process.stdout is not None:
            self._reader_task = self._tasks.spawn(child.read_output(process.stdout, self.log),
                                                  "output")
        try:
            code = await child.until_ready(process, spec, self.settings.api_key, self._probe,
                                           self.timeouts)
        except TimeoutError:
            await self._terminate()
            raise ModelStartError(
                f"{self.name}: not ready within load_timeout={self.timeouts.load_timeout:g} s; "
                "killed" + child.log_excerpt(self.log)) from None
        if code is None:
            self.load_seconds = self._clock() - began
            return Endpoint(spec.base_url, self.settings.api_key, process.pid,
                            self.settings.host, self.settings.port)
        await self._finish_process()
        raise ModelStartError(
            f"{self.name}: server exited while starting ({child.describe_exit(code)})"
            + child.log_excerpt(self.log)
        )

    # --- while ready --------------------------------------------------------------------------
    async def _watch(self) -> None:
        """Race the process's exit against periodic health checks; a hang is killed.

        The moment the process is gone the model is `failed` (not leasable) and its events
        are told; the log is drained and the reason completed afterwards.
        """
        process = self._process
        spec = self._spec
        assert process is not None and spec is not None
        ended = await child.watch(
            process, spec, self.timeouts,
            lambda: child.healthy(spec, self.settings.api_key, self._probe, self.timeouts),
            self._while_healthy, self._clock, self.log)
        reason = ended.reason
        if ended.killed_from_outside:
            reason = child.memory_kill(self.run_peak, self._oom_kills_at_ready, self._oom_kills())
            self.memory_reached = self.run_peak
        uptime = self.uptime()
        self._drop_endpoint(reason)
        self.last_error = self.last_exit = reason
        self._set_state(ModelState.FAILED)
        log.warning("%s: %s", self.name, reason)
        if ended.killed_from_outside and self.run_peak is not None:
            self._events.out_of_memory(self.run_peak)  # before the restart is decided
        self._events.crashed(uptime)
        await self._finish_process()
        self.last_error = reason + child.log_excerpt(self.log)
        self.log.note(f"failed: {reason}")
        self._health_task = None

    async def _while_healthy(self) -> None:
        await self._poll_sleep()
        self._sample_memory()

    def _sample_memory(self) -> None:
        if self._process is None:
            return
        rss = platform.rss_of(self._process.pid, children=self.engine.kind == "llamafile")
        if rss is None:
            return
        self.rss = rss
        self.run_peak = max(rss, self.run_peak or 0)
        if self.rss_peak is None or rss > self.rss_peak:
            self.rss_peak = rss
            self._events.measured(rss)

    # --- sleeping --------------------------------------------------------------------------------
    async def _poll_sleep(self) -> None:
        """Learn from the server whether it sleeps (it never wakes for this question)."""
        if self._sleep_probe is None or self._endpoint is None:
            return
        asleep = await self._sleep_probe(self._endpoint.base_url, self._endpoint.api_key,
                                         min(self.timeouts.liveness_timeout, 5.0))
        if asleep is None or self._state != ModelState.READY:
            return
        if self._waking_until is not None:
            # while it reloads its weights the server still says it sleeps: believe that
            # only once it has said it is awake, or when the wake takes far too long
            if asleep and self._clock() < self._waking_until:
                return
            self._waking_until = None
        self._set_asleep(asleep)

    def mark_awake(self) -> None:
        """A request is about to wake the server: ready again, and its RSS is unknown until
        the next sample (the budget counts its full size meanwhile)."""
        if self._asleep:
            self.rss = None
            self._waking_until = self._clock() + max(self.timeouts.liveness_timeout,
                                                     2 * (self.load_seconds or 0.0))
            self._set_asleep(False)

    def _set_asleep(self, asleep: bool) -> None:
        if asleep == self._asleep:
            return
        old = self.reported_state
        self._asleep = asleep
        log.info("%s: %s -> %s", self.name, old, self.reported_state)
        self.log.note("sleeping: weights freed, process kept" if asleep else "awake")
        if asleep and self._prompt_cache is not None:  # lalo's engine saved its slots
            self._prompt_cache.saved_by_server()
        self._events.changed(self.reported_state)

    def _fail_outcome(self, error: Exception) -> None:
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_exception(error)

    # --- processes ----------------------------------------------------------------------------
    async def _terminate(self) -> None:
        """TERM the group, wait stop_timeout, KILL the group, reap. Safe when nothing runs."""
        process = self._process
        if process is None:
            return
        await child.terminate(process, self.timeouts.stop_timeout, self.log)
        await self._finish_process()

    async def _finish_process(self) -> None:
        """Reap bookkeeping once the process has exited: drain its output (2 s at most)."""
        process = self._process
        if process is None:
            return
        reader = self._reader_task
        if reader is not None:
            # asyncio.wait never raises the reader's errors and lets our own cancel through
            await asyncio.wait({reader}, timeout=2.0)
            self._cancel(reader)
            self._reader_task = None
        if self._process is not process:
            return  # someone else finished it while we waited
        self.log.note(f"pid {process.pid} exited ({child.describe_exit(process.returncode)})")
        self._events.reaped(process.pid)
        self._process = None
        self._drop_endpoint()
        self.started_at = None
        self.rss = None
        self._asleep = False
        self._waking_until = None

    # --- plumbing -----------------------------------------------------------------------------
    def _set_state(self, new: ModelState) -> None:
        old = self._state
        if new == old:
            return
        check_transition(self.name, old, new)
        self._state = new
        log.info("%s: %s -> %s", self.name, old, new)
        self._events.changed(new)

    @staticmethod
    def _cancel(task: asyncio.Task[Any] | None) -> None:
        if task is not None and not task.done():
            task.cancel()

    def snapshot(self) -> dict[str, Any]:
        uptime = self.uptime()
        return {
            "state": str(self.reported_state),
            "pid": self.pid,
            "port": self.port if self._state in (ModelState.STARTING, ModelState.READY) else None,
            "rss": self.rss,
            "rss_peak": self.rss_peak,
            "uptime_s": round(uptime, 1) if uptime is not None else None,
            "last_error": self.last_error,
            "last_exit": self.last_exit,
            "memory_reached": self.memory_reached,
            "load_seconds": round(self.load_seconds, 3) if self.load_seconds is not None else None,
            "buffers": dict(self.log.buffers),
        }


def _consume_exception(future: asyncio.Future[Any]) -> None:
    # a start may fail with nobody waiting; don't let asyncio log "exception never retrieved"
    if not future.cancelled():
        future.exception()
