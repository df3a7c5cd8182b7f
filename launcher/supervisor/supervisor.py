"""The supervisor: the one owner of every model server start, of admission and of eviction.

Callers (the proxy, admin routes) never read a model's state and then act on it; they
call `lease()` (requests), `load()`, `unload()` or `restart()`, and the supervisor decides:
every decision is taken in `_dispatch()` (`launcher.supervisor.admission`). This module is
what surrounds it: construction, restarts after a crash (with backoff, through admission),
the admin calls, reloads, the idle unload (a ttl, or RAM short on the machine), shutdown and
reporting (`status.py`).

Each model is built with its share of the supervisor's events (`SupervisorEvents.for_model`):
that is how a crash or a new memory peak reaches it, the moment it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from launcher.errors import ModelError, ModelFailedError, ModelStoppedError
from launcher.machine import memory as machine_memory
from launcher.models.capabilities import Capabilities
from launcher.placement.scheduler import victim_order
from launcher.supervisor.admission import Admission
from launcher.supervisor.events import SupervisorEvents
from launcher.supervisor.governor import ThreadGovernor
from launcher.supervisor.policy import RestartPolicy
from launcher.supervisor.process import ManagedModel
from launcher.supervisor.records import WAIT_BUCKETS, ModelRecord, SupervisedModel
from launcher.supervisor.snapshot import ModelSnapshot
from launcher.supervisor.state import Endpoint, ModelState
from launcher.supervisor.status import snapshot_of, status_row
from launcher.supervisor.tasks import Tasks
from launcher.units import format_size

__all__ = ["WAIT_BUCKETS", "ModelRecord", "SupervisedModel", "Supervisor", "SupervisorEvents"]

log = logging.getLogger(__name__)

# checks of the periodic loop (one a second) in a row that must find RAM under the reserve
# before an idle model is unloaded for it: a moment's spike unloads nothing
RAM_SHORT_CHECKS = 2


class Supervisor(Admission):
    def __init__(
        self,
        models: Sequence[tuple[SupervisedModel, ManagedModel]],
        *,
        ram_budget: int | str = "auto",
        ram_reserve: int = 1024**3,
        max_loaded: int = 0,
        queue_size: int = 64,
        max_wait: float = 10.0,
        wait_timeout: float | None = None,
        drain_timeout: float = 60.0,
        yield_memory: bool = True,
        policies: Mapping[str, RestartPolicy] | None = None,
        measured: Mapping[str, int] | None = None,
        events: SupervisorEvents | None = None,  # what `models` were built with
        governor: ThreadGovernor | None = None,  # threads of the `governed` models
        available_memory: Callable[[], int] = machine_memory.available_memory,
        total_memory: Callable[[], int] = machine_memory.total_memory,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.events = events or SupervisorEvents()
        self.governor = governor
        self.events.attach(self)
        self._records = {}
        for meta, managed in models:
            self.events.check(meta.name, managed.events)
            record = ModelRecord(
                meta=meta, model=managed,
                policy=(policies or {}).get(meta.name) or RestartPolicy(),
                parallel=managed.settings.parallel, queue_size=queue_size,
            )
            record.drained.set()
            self._records[meta.name] = record
        self.names: Mapping[str, str] = {}  # name or alias -> name; republished, never changed
        # name -> what it can serve (where known), published with the names: the proxy's
        # check before a request is forwarded is one lookup
        self.capabilities: Mapping[str, Capabilities] = {}
        self._publish_names()
        self._measured = dict(measured or {})
        self._ram_budget = ram_budget
        self._ram_reserve = ram_reserve
        self.max_loaded = max_loaded
        self.max_wait = max_wait
        self._queue_size = queue_size
        self.wait_timeout = wait_timeout
        self.drain_timeout = drain_timeout
        self.yield_memory = yield_memory
        self._ram_short_checks = 0  # periodic checks in a row that found RAM under the reserve
        self._available = available_memory
        self._total = total_memory
        self._clock = clock
        self._sleep = sleep
        self._tasks = Tasks("supervisor")
        self._wakeup = None
        self._closing = False
        self._closed = frozenset()
        self.started_at = clock()

    # --- names --------------------------------------------------------------------------------
    def _publish_names(self) -> None:
        # a new read-only mapping each time (config order): a reader keeps a consistent one
        self.names = MappingProxyType({alias: r.name for r in self._records.values()
                                       for alias in (r.name, *r.meta.aliases)})
        self.capabilities = MappingProxyType({r.name: r.meta.capabilities
                                              for r in self._records.values()
                                              if r.meta.capabilities is not None})

    def resolve(self, name: str) -> str | None:
        return self.names.get(name)

    def names_and_aliases(self) -> list[str]:
        return list(self.names)

    @property
    def models(self) -> Mapping[str, ManagedModel]:
        """The servers, for the composition root and tests (the proxy reads snapshots)."""
        return {n: r.model for n, r in self._records.items()}

    @property
    def info(self) -> Mapping[str, SupervisedModel]:
        return {n: r.meta for n, r in self._records.items()}

    def record(self, name: str) -> ModelRecord:
        return self._records[name]

    def is_loading(self, name: str) -> bool:
        """True while `name` is being started or restarted (for keep-alive comments)."""
        record = self._records[name]
        return (record.loading or record.state == ModelState.STARTING
                or record.restart_at is not None or record.restart_due)

    def model_changed(self, name: str, state: ModelState) -> None:
        """Each state change of a server: the governor follows the governed ones' endpoints."""
        record = self._records.get(name)
        if self.governor is None or record is None or not record.meta.governed:
            return
        endpoint = record.model.endpoint
        if state in (ModelState.READY, ModelState.SLEEPING) and endpoint is not None:
            self.governor.ready(name, endpoint)
        elif state != ModelState.SLEEPING:
            self.governor.gone(name)

    def thread_share(self) -> dict[str, Any] | None:
        """The governor's last split (None without one): CPUs, those other programs keep busy,
        the busy models, in words too."""
        if self.governor is None:
            return None
        share = self.governor.share
        return {"cpus": share.cpus, "others_busy": share.others, "busy": list(share.busy),
                "threads": dict(share.threads), "text": share.describe()}

    def threads(self, name: str) -> int | None:
        """The compute threads the governor set on `name`'s server (None: not governed)."""
        return self.governor.threads(name) if self.governor is not None else None

    # --- restarts after a crash or a failed start ------------------------------------------
    def model_out_of_memory(self, name: str, rss: int) -> None:
        """A server was killed for memory having reached `rss`: it needs at least that, so its
        restart (`model_crashed` follows) waits until that fits, or is given up."""
        self.record_measurement(name, rss)
        log.info("%s: needs at least %s from now on (what it had reached when killed)",
                 name, format_size(self.required(name)))

    def model_crashed(self, name: str, uptime: float | None) -> None:
        """A ready server exited or hung (its events tell): not leasable already; restart
        after backoff."""
        record = self._records[name]
        if self._closing or record.draining:
            return
        self._schedule_restart(record, uptime)
        self._dispatch()

    def _schedule_restart(self, record: ModelRecord, uptime: float | None) -> None:
        delay = record.policy.on_failure(uptime)
        if delay is None:
            record.model.log.note(f"giving up after {record.policy.failures} failures; "
                                  "failed until an explicit restart")
            self._fail_waiters(record, ModelFailedError(
                f"{record.name}: failed: {record.model.last_error}"))
            return
        record.restarts += 1
        record.restart_at = self._clock() + delay
        record.model.log.note(f"restarting in {delay:g} s")
        record.restart_timer = self._tasks.spawn(self._restart_after(record, delay),
                                                  f"restart {record.name}")

    def _cancel_restart(self, record: ModelRecord) -> None:
        if record.restart_timer is not None:
            record.restart_timer.cancel()
            record.restart_timer = None
        record.restart_at = None
        record.restart_due = False

    async def _restart_after(self, record: ModelRecord, delay: float) -> None:
        await self._sleep(delay)
        record.restart_timer = None
        record.restart_at = None
        record.restart_due = True  # through admission like any load
        self._dispatch()

    # --- admin --------------------------------------------------------------------------------
    async def start_preloads(self, names: Sequence[str]) -> dict[str, BaseException | None]:
        """Start the planned preload models in parallel; returns each one's error or None."""
        results = await asyncio.gather(*(self.load(name) for name in names), return_exceptions=True)
        return {name: (result if isinstance(result, BaseException) else None)
                for name, result in zip(names, results, strict=True)}

    async def load(self, name: str) -> Endpoint:
        """Make `name` ready (through admission, like a request, but taking no slot)."""
        record = self._records[name]
        endpoint = record.model.endpoint
        if record.grantable and endpoint is not None:
            return endpoint
        refusal = self._refusal(record)
        if refusal is not None:
            raise refusal
        return await self._wait(record, slot=False,
                                limit=self.wait_timeout or record.model.timeouts.load_timeout * 2)

    async def unload(self, name: str, reason: str = "unload requested") -> None:
        """Stop `name` once its requests in flight are done (bounded by drain_timeout)."""
        record = self._records[name]
        record.draining = True
        self._cancel_restart(record)
        try:
            await self._drain(record)
            await record.model.stop(reason)
        finally:
            record.draining = False
            self._dispatch()

    async def restart(self, name: str) -> Endpoint:
        """Explicit restart: forgets past failures, drains, stops, loads again."""
        record = self._records[name]
        record.policy.reset()
        await self.unload(name, "restart requested")
        return await self.load(name)

    # --- reload -------------------------------------------------------------------------------
    async def reconfigure(
        self,
        *,
        replace: Sequence[tuple[SupervisedModel, ManagedModel, RestartPolicy]] = (),
        remove: Sequence[str] = (),
        max_loaded: int | None = None,
        max_wait: float | None = None,
        ram_budget: int | str | None = None,
        ram_reserve: int | None = None,
        yield_memory: bool | None = None,
    ) -> None:
        """Apply a reloaded config: models in `replace` are new or changed (a changed one is
        drained and stopped first; its waiting requests move to the new server), `remove`d
        ones are drained and stopped; every other model and its server is left alone."""
        for meta, managed, _ in replace:  # before anything changes
            self.events.check(meta.name, managed.events)
        if max_loaded is not None:
            self.max_loaded = max_loaded
        if max_wait is not None:
            self.max_wait = max_wait
        if ram_budget is not None:
            self._ram_budget = ram_budget
        if ram_reserve is not None:
            self._ram_reserve = ram_reserve
        if yield_memory is not None:
            self.yield_memory = yield_memory
        changed = [meta.name for meta, _, _ in replace if meta.name in self._records]
        leaving = [self._records[name] for name in (*changed, *remove)]
        await asyncio.gather(*(self._retire(r, "config reloaded") for r in leaving))
        for name in remove:
            record = self._records.pop(name)
            self._fail_waiters(record, ModelStoppedError(f"{name}: removed from the config"))
            record.model.log.close()
        for meta, managed, policy in replace:
            old = self._records.get(meta.name)
            record = ModelRecord(meta=meta, model=managed, policy=policy,
                                 parallel=managed.settings.parallel,
                                 queue_size=old.queue_size if old else self._queue_size)
            record.drained.set()
            if old is not None:
                record.queue, old.queue = old.queue, deque()  # waiters go to the new server
                record.requests, record.completion_tokens = old.requests, old.completion_tokens
                old.model.log.close()
            self._records[meta.name] = record
            if old is not None and old.meta.measurement_key != meta.measurement_key:
                self._measured.pop(meta.name, None)
        self._publish_names()
        for meta, _, _ in replace:
            if meta.preload:
                self._tasks.spawn(self._preload_quietly(meta.name), f"preload {meta.name}")
        self._dispatch()

    async def _retire(self, record: ModelRecord, reason: str) -> None:
        """Drain and stop a model that is being replaced or removed; it takes nothing new."""
        record.draining = True
        self._cancel_restart(record)
        await self._drain(record)
        await record.model.stop(reason)

    async def _preload_quietly(self, name: str) -> None:
        with contextlib.suppress(ModelError):
            await self.load(name)

    # --- background ---------------------------------------------------------------------------
    def start_background(self, ttl_interval: float = 1.0) -> None:
        if self.governor is not None:
            self.governor.start()
        # always: a client's keep_alive (set_idle_timeout) may give any model a ttl later
        self._tasks.spawn(self._unload_idle(ttl_interval), "idle unload")

    def set_idle_timeout(self, name: str, seconds: float | None) -> None:
        """A client's keep_alive for `name` (the Ollama API): unload once idle that long
        (< 0: never); None: lalo.yaml's ttl again. The idle unload
        below applies it, like the ttl it overrides."""
        # a negative keep_alive is a ttl of 0: never unloaded for being idle
        self._records[name].idle_timeout = None if seconds is None else max(seconds, 0.0)

    async def _unload_idle(self, interval: float) -> None:
        while True:
            await self._sleep(interval)
            await self._unload_expired()
            await self._relieve_ram()

    async def _unload_expired(self) -> None:
        now = self._clock()
        for record in list(self._records.values()):
            meta, model, ttl = record.meta, record.model, record.ttl
            if (ttl > 0 and record.grantable and not record.busy
                    and now - max(record.last_used, model.started_at or 0.0) >= ttl):
                record.idle_timeout = None  # spent: the next load starts with the ttl
                log.info("%s: idle for %g s (ttl), unloading", meta.name, ttl)
                await self.unload(meta.name, f"idle for {ttl:g} s (ttl)")

    def yield_floor(self) -> int:
        """The available RAM under which idle models make room: the reserve, but with a
        configured budget never more than the machine leaves beside that budget (in a 256 MiB
        pod, with a budget of 160 MiB, the default 1 GiB reserve can never be free: yielding to
        it would unload every model the moment it idles)."""
        if isinstance(self._ram_budget, int):
            return min(self._ram_reserve, max(self._total() - self._ram_budget, 0))
        return self._ram_reserve

    async def _relieve_ram(self) -> None:
        """While the machine's available RAM stays under the reserve (RAM_SHORT_CHECKS checks
        in a row), unload idle unpinned models, cheapest to bring back first, one per check."""
        if any(r.queue and not r.resident for r in self._records.values()):
            self._dispatch()  # requests waiting for RAM to come back: decide again
        available = self._available()
        floor = self.yield_floor()
        if not self.yield_memory or available >= floor:
            self._ram_short_checks = 0
            return
        self._ram_short_checks += 1
        idle = [self._view_of(r) for r in self._records.values()
                if r.grantable and not r.busy and not r.meta.pinned and r.name not in self._closed]
        if self._ram_short_checks < RAM_SHORT_CHECKS or not idle:
            return
        victim = victim_order(idle)[0]
        why = (f"RAM short: {format_size(available)} available, under the reserve "
               f"{format_size(floor)}")
        log.warning("%s: unloading idle %s (%s)", why, victim.name, format_size(victim.required))
        await self.unload(victim.name, why)

    async def close(self) -> None:
        """Refuse new work, then stop every server in parallel and wait until all have exited."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.cancel()
        for record in self._records.values():
            self._fail_waiters(record, ModelStoppedError(f"{record.name}: lalo is shutting down"))
            self._cancel_restart(record)
        await self._tasks.close()
        if self.governor is not None:
            await self.governor.stop()
        await asyncio.gather(*(r.model.close() for r in self._records.values()),
                             return_exceptions=True)

    # --- reporting ----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, ModelSnapshot]:
        """Every model as it is now, in config order: immutable copies, safe to keep."""
        return {name: snapshot_of(record, self.required(name), self.threads(name))
                for name, record in self._records.items()}

    def status(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [status_row(record, measured=self._measured.get(name),
                           loading=self.is_loading(name), now=now, threads=self.threads(name))
                for name, record in self._records.items()]
