"""The supervisor: the one owner of every model server start, of admission and of eviction.

Callers (the proxy, admin routes) never read a model's state and then act on it; they
call `lease()` (requests), `load()`, `unload()` or `restart()`, and the supervisor decides.
Every decision is taken synchronously in `_dispatch()` (no await between looking and
acting), from the pure rules in `launcher.placement.scheduler`:

- first loads, on-demand loads and restarts after a crash (once their backoff is over) all
  go through the same admission; a model whose restart is pending keeps its memory;
- a request for a model that does not fit *now* waits in line (bounded by `wait_timeout`);
  only a model that can never fit is refused (CapacityError);
- a loaded model serves its own queue while others wait (batch by model) until the oldest
  waiter has waited `max_wait`; then the models in its way take no new requests, finish
  the ones in flight, and are evicted. A victim is marked draining before the first await,
  so no request can lease it, and no request is ever cut to make room.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from launcher.config.request_params import RequestRules
from launcher.errors import (
    CapacityError,
    ModelError,
    ModelFailedError,
    ModelStartError,
    ModelStoppedError,
    QueueFullError,
    WaitTimeoutError,
)
from launcher.machine import memory as machine_memory
from launcher.placement.planner import Budget, compute_budget
from launcher.placement.scheduler import Load, ModelView, Schedule, never_fits, schedule
from launcher.supervisor.lease import LeaseRequest, LocalLease
from launcher.supervisor.policy import RestartPolicy
from launcher.supervisor.process import Endpoint, ManagedModel, ModelState, ProcessEvents
from launcher.supervisor.snapshot import ModelSnapshot

log = logging.getLogger(__name__)

WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class SupervisedModel:
    """Static facts about a model the supervisor runs."""

    name: str
    aliases: tuple[str, ...]
    engine: str
    estimate: int
    preload: bool
    ttl: float
    path: str
    synthetic: bool = False
    measurement_key: str = ""
    pinned: bool = False  # never evicted
    # what llama-server is told that sizes its memory (shown in /api/status beside the estimate)
    ctx_size: int = 0
    parallel: int = 1
    kv_cache: str = "f16"
    # what the proxy does to its requests' parameters (lalo.yaml defaults/set/limits/strip)
    request_rules: RequestRules | None = None


@dataclass
class _Waiter:
    future: asyncio.Future[Endpoint]
    since: float
    slot: bool  # a request (takes a slot) or a load call (needs the model ready only)


@dataclass
class WaitStats:
    """A histogram of how long requests waited for their model (for /metrics)."""

    buckets: list[int] = field(default_factory=lambda: [0] * len(WAIT_BUCKETS))
    count: int = 0
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(WAIT_BUCKETS, seconds)
        if index < len(self.buckets):
            self.buckets[index] += 1
        self.count += 1
        self.total += seconds


@dataclass
class ModelRecord:
    """Everything the supervisor knows about one model; only the supervisor changes it."""

    meta: SupervisedModel
    model: ManagedModel
    policy: RestartPolicy
    parallel: int
    queue_size: int
    queue: deque[_Waiter] = field(default_factory=deque)
    in_flight: int = 0
    requests: int = 0
    last_used: float = 0.0
    completion_tokens: int = 0
    token_rates: list[tuple[float, float]] = field(default_factory=list)  # (wall time, tok/s)
    loads: int = 0
    wakes: int = 0  # wakes from sleep admitted (the server was kept: no load)
    evictions: int = 0
    restarts: int = 0
    swaps: Counter[str] = field(default_factory=Counter)  # evictions of this model, by cause
    waits: WaitStats = field(default_factory=WaitStats)
    loading: bool = False  # a load owns it: its victims stop, then it starts
    load_began: float | None = None  # clock() when the load under way began
    restart_at: float | None = None  # clock() of a pending crash restart (memory kept)
    restart_timer: asyncio.Task[None] | None = None
    restart_due: bool = False  # backoff over: waits for admission
    draining: bool = False  # takes no new requests (unload, eviction) until it has stopped
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    waiting_reason: str | None = None
    wake_admitted: bool = False  # asleep, and its wake passed admission: the next grant wakes it
    idle_timeout: float | None = None  # a client's keep_alive (Ollama API): overrides meta.ttl

    @property
    def ttl(self) -> float:
        """Idle seconds before the idle unload (0: never)."""
        return self.meta.ttl if self.idle_timeout is None else self.idle_timeout

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def state(self) -> ModelState:
        return self.model.state

    @property
    def resident(self) -> bool:
        """Holds (or has reserved) memory."""
        return (self.loading or self.restart_at is not None
                or self.state in (ModelState.STARTING, ModelState.READY, ModelState.STOPPING))

    @property
    def must_wake(self) -> bool:
        """Asleep (weights freed) with requests waiting, its wake not yet admitted: waking
        takes its full size back, so it is admitted like a load."""
        return (self.model.asleep and not self.wake_admitted and bool(self.queue)
                and not self.loading)  # while its wake is under way it is resident

    @property
    def grantable(self) -> bool:
        return (self.state == ModelState.READY and not self.draining and not self.loading
                and self.model.endpoint is not None
                and not (self.model.asleep and not self.wake_admitted))

    @property
    def failed_for_good(self) -> bool:
        return (self.state == ModelState.FAILED and self.restart_at is None
                and not self.restart_due and not self.loading)

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or bool(self.queue)


class Supervisor:
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
        policies: Mapping[str, RestartPolicy] | None = None,
        measured: Mapping[str, int] | None = None,
        on_measured: Callable[[str, int], None] | None = None,
        available_memory: Callable[[], int] = machine_memory.available_memory,
        total_memory: Callable[[], int] = machine_memory.total_memory,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._records: dict[str, ModelRecord] = {}
        for meta, managed in models:
            record = ModelRecord(
                meta=meta, model=managed,
                policy=(policies or {}).get(meta.name) or RestartPolicy(),
                parallel=managed.settings.parallel, queue_size=queue_size,
            )
            record.drained.set()
            managed.on_exit = self._on_exit
            managed.on_measured = self.record_measurement
            self._records[meta.name] = record
        self.names: Mapping[str, str] = {}  # name or alias -> name; republished, never changed
        self._publish_names()
        self._measured = dict(measured or {})
        self._on_measured = on_measured
        self._ram_budget = ram_budget
        self._ram_reserve = ram_reserve
        self.max_loaded = max_loaded
        self.max_wait = max_wait
        self._queue_size = queue_size
        self.wait_timeout = wait_timeout
        self.drain_timeout = drain_timeout
        self._available = available_memory
        self._total = total_memory
        self._clock = clock
        self._sleep = sleep
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wakeup: asyncio.TimerHandle | None = None
        self._closing = False
        self._closed: frozenset[str] = frozenset()  # models draining for a starved waiter
        self.started_at = clock()

    # --- names --------------------------------------------------------------------------------
    def _publish_names(self) -> None:
        # a new read-only mapping each time (config order): a reader keeps a consistent one
        self.names = MappingProxyType({alias: r.name for r in self._records.values()
                                       for alias in (r.name, *r.meta.aliases)})

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

    # --- memory -------------------------------------------------------------------------------
    def required(self, name: str) -> int:
        """What `name` needs: its measured peak RSS when known, else the estimate."""
        return self._measured.get(name) or self._records[name].meta.estimate

    def _holds(self, record: ModelRecord) -> int:
        """What a model counts for in admission: a fresh server grows to what it needs; a
        sleeping one holds what it measures (its weights are freed) until its wake is admitted
        (`must_wake`), which counts it at full size again."""
        if record.model.asleep and not record.wake_admitted and record.model.rss:
            return record.model.rss
        return max(record.model.rss or 0, self.required(record.name))

    def budget(self) -> Budget:
        """The budget now; `auto` follows available RAM (counting our own servers as reclaimable)."""
        ours = sum((r.model.rss or self.required(r.name)) for r in self._records.values()
                   if r.model.pid is not None and r.resident)
        # never more than the machine (a container's limit: the page cache our servers map may
        # be charged to another cgroup, so their RSS is not all inside the cgroup's usage)
        base = min(self._available() + ours, self._total())
        return compute_budget(self._ram_budget, self._ram_reserve, base)

    def record_measurement(self, name: str, rss: int) -> None:
        if rss > self._measured.get(name, 0):
            self._measured[name] = rss
            if self._on_measured is not None:
                self._on_measured(name, rss)

    # --- the views the scheduler decides on ---------------------------------------------------
    def _view(self, record: ModelRecord) -> ModelView:
        waiting = [w.since for w in record.queue]
        queued = len(record.queue) + (1 if record.restart_due else 0)
        if record.draining and not record.resident:
            queued = 0  # an unload under way: do not bring it back before it is done
        if record.must_wake:  # to the scheduler, a load of its full size
            return ModelView(
                name=record.name, required=self.required(record.name), resident=False,
                evictable=False, in_flight=0, queued=queued, oldest_wait=min(waiting),
                pinned=record.meta.pinned, last_used=record.last_used,
                load_seconds=record.model.load_seconds, failed=False, ready_since=None)
        return ModelView(
            name=record.name,
            required=self._holds(record),
            resident=record.resident,
            evictable=(record.state == ModelState.READY and not record.draining
                       and not record.loading),
            in_flight=record.in_flight,
            queued=queued,
            oldest_wait=min(waiting) if waiting else (self._clock() if queued else None),
            pinned=record.meta.pinned,
            last_used=record.last_used,
            load_seconds=record.model.load_seconds,
            failed=record.failed_for_good,
            ready_since=record.model.started_at,
        )

    def _refusal(self, record: ModelRecord) -> ModelError | None:
        """Why a request for `record` is refused at once, or None (it may wait)."""
        if self._closing:
            return ModelStoppedError(f"{record.name}: lalo is shutting down")
        if record.failed_for_good:
            return ModelFailedError(f"{record.name}: failed: {record.model.last_error}")
        if record.resident:
            return None
        views = [self._view(r) for r in self._records.values()]
        why = never_fits(self._view(record), views, self.budget().bytes, self.max_loaded)
        if why is not None:
            return CapacityError(why)
        return None

    # --- requests -----------------------------------------------------------------------------
    def lease(self, name: str) -> LeaseRequest:
        """`async with supervisor.lease(name) as lease:` holds one of `name`'s slots for one
        request, once it is ready.

        Waits (in line for a slot, for a load, for a restart after a crash, for another
        model's batch) within `wait_timeout`. Safe to cancel at any await: a cancelled
        request leaves no count, no slot and no place in line behind.
        """
        return _LocalRequest(self, self._records[name])

    async def _acquire(self, record: ModelRecord) -> LocalLease:
        refusal = self._refusal(record)
        if refusal is not None:
            raise refusal
        if record.in_flight >= record.parallel and len(record.queue) >= record.queue_size:
            raise QueueFullError(
                f"{record.name}: {record.in_flight} requests running and {len(record.queue)} "
                f"queued (queue_size {record.queue_size})"
            )
        endpoint = await self._wait(record, slot=True)
        # granted synchronously with the endpoint: `gone` is that endpoint's
        name = record.name
        return LocalLease(endpoint=endpoint, assembles=record.meta.engine == "llama-server",
                          gone=record.model.gone, request_rules=record.meta.request_rules,
                          on_tokens=lambda tokens, seconds: self.record_tokens(name, tokens, seconds))

    async def _wait(self, record: ModelRecord, *, slot: bool,
                    limit: float | None = None) -> Endpoint:
        now = self._clock()
        if (slot and record.grantable and not record.queue and record.in_flight < record.parallel
                and record.name not in self._closed):
            # the common case: ready, a slot free, nobody ahead; no decision to take
            endpoint = record.model.endpoint
            assert endpoint is not None
            self._take_slot(record, 0.0)
            record.last_used = now
            return endpoint
        waiter = _Waiter(asyncio.get_running_loop().create_future(), now, slot)
        record.queue.append(waiter)
        record.last_used = waiter.since
        self._dispatch()
        limit = limit if limit is not None else self.wait_timeout
        granted = False
        try:
            try:
                async with asyncio.timeout(limit):
                    endpoint = await asyncio.shield(waiter.future)
            except TimeoutError:
                raise WaitTimeoutError(
                    f"{record.name}: not ready within {limit:g} s"
                    + (f" ({record.waiting_reason})" if record.waiting_reason else ""),
                    retry_after=max(1.0, record.model.load_seconds or 1.0),
                ) from None
            granted = True
            return endpoint
        finally:
            if not granted:
                self._withdraw(record, waiter)

    def _withdraw(self, record: ModelRecord, waiter: _Waiter) -> None:
        """A waiter gave up (cancel, timeout, error): no place in line, no slot left behind."""
        with contextlib.suppress(ValueError):
            record.queue.remove(waiter)
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None and waiter.slot:
            self._release(record)  # granted just as it was cancelled: hand the slot back
            return
        if not future.done():
            future.cancel()
        self._dispatch()

    def _release(self, record: ModelRecord) -> None:
        record.in_flight -= 1
        record.last_used = self._clock()
        if record.in_flight == 0:
            record.drained.set()
        self._dispatch()

    def record_tokens(self, name: str, tokens: int, seconds: float) -> None:
        record = self._records.get(name)
        if record is None:  # removed by a reload while the request ran
            return
        record.completion_tokens += tokens
        if tokens > 0 and seconds > 0:
            record.token_rates.append((time.time(), tokens / seconds))
            del record.token_rates[:-60]

    # --- the one place that decides -----------------------------------------------------------
    def wake(self) -> None:
        """Decide again now (the max_wait timer calls it; so do tests that move a fake clock)."""
        self._dispatch()

    def _dispatch(self) -> None:
        """Grant slots, refuse the impossible, start loads: synchronously, from one snapshot."""
        if self._closing:
            return
        now = self._clock()
        records = list(self._records.values())
        for record in records:
            if record.failed_for_good and record.queue:
                self._fail_waiters(record, ModelFailedError(
                    f"{record.name}: failed: {record.model.last_error}"))
        if any(((r.queue or r.restart_due) and not r.resident) or r.must_wake for r in records):
            plan = schedule([self._view(r) for r in records], self.budget().bytes,
                            self.max_loaded, now, self.max_wait)
        else:
            plan = Schedule()  # everything wanted is loaded or loading: grants only
        self._closed = plan.closed
        for name, why in plan.refused:
            self._fail_waiters(self._records[name], CapacityError(why))
        for load in plan.loads:
            self._begin_load(load)  # marks its victims draining: granted nothing below
        for record in records:
            if record.grantable and record.name not in plan.closed:
                self._grant(record, now)
        for name, why in plan.waiting:
            record = self._records[name]
            if record.waiting_reason != why:
                log.info("%s: %d request(s) wait: %s", name, len(record.queue), why)
            record.waiting_reason = why
        self._arm_wakeup(plan.waiting, now)

    def _grant(self, record: ModelRecord, now: float) -> None:
        endpoint = record.model.endpoint
        assert endpoint is not None
        kept: deque[_Waiter] = deque()
        for waiter in record.queue:
            if waiter.future.done():
                continue
            if not waiter.slot:
                waiter.future.set_result(endpoint)  # a load call: ready is all it wanted
            elif record.in_flight < record.parallel:
                # a sleeping server wakes for this request: its RSS grows back to full size
                # (its wake was admitted at full size; see must_wake)
                record.model.mark_awake()
                record.wake_admitted = False
                self._take_slot(record, now - waiter.since)
                waiter.future.set_result(endpoint)
            else:
                kept.append(waiter)
        record.queue = kept
        if not kept:
            record.waiting_reason = None

    def _take_slot(self, record: ModelRecord, waited: float) -> None:
        record.in_flight += 1
        record.requests += 1
        record.drained.clear()
        record.waits.observe(waited)

    def _arm_wakeup(self, waiting: Sequence[tuple[str, str]], now: float) -> None:
        """Decide again when the oldest waiter reaches max_wait (if nothing else happens first)."""
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        oldest = [w.since for name, _ in waiting for w in self._records[name].queue]
        if not oldest:
            return
        # the next moment a rule can change its answer: the oldest waiter reaching max_wait,
        # or a model's batch window closing; otherwise the next event decides
        moments = [min(oldest) + self.max_wait] + [
            r.model.started_at + self.max_wait for r in self._records.values()
            if r.model.started_at is not None and r.state == ModelState.READY]
        future = [moment for moment in moments if moment > now]
        if future:
            delay = min(future) - now + 0.01
            self._wakeup = asyncio.get_running_loop().call_later(delay, self._dispatch)

    def _fail_waiters(self, record: ModelRecord, error: ModelError) -> None:
        while record.queue:
            waiter = record.queue.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(error)
        record.waiting_reason = None

    # --- loading ------------------------------------------------------------------------------
    def _begin_load(self, load: Load) -> None:
        record = self._records[load.name]
        victims = [self._records[v] for v in load.victims]
        if record.must_wake:
            record.wakes += 1
        else:
            record.loads += 1
        record.loading = True  # resident from now on, before any await
        record.load_began = self._clock()
        record.restart_due = False
        for victim in victims:
            victim.draining = True  # no new request can lease a victim
        if victims or load.cause != "fits":
            log.info("%s: %s: %s", load.name, "loading" if not record.model.asleep else "waking",
                     load.reason)
        self._spawn(self._load(record, victims, load.cause))

    async def _load(self, record: ModelRecord, victims: list[ModelRecord], cause: str) -> None:
        try:
            if victims:
                await asyncio.gather(*(self._evict(v, record.name, cause) for v in victims))
            if record.model.asleep and record.model.endpoint is not None:
                # a wake: the server is there, its memory is now free; a request wakes it
                record.wake_admitted = True
                log.info("%s: waking (%s)", record.name, cause)
                return
            await record.model.wait_stopped()
            await record.model.start()
        except ModelError as exc:
            record.loading = False
            self._start_failed(record, exc)
        finally:
            record.loading = False
            record.load_began = None
            self._dispatch()

    async def _evict(self, victim: ModelRecord, name: str, cause: str) -> None:
        try:
            await self._drain(victim)
            await victim.model.stop(f"unloaded to make room for {name}")
            victim.evictions += 1
            victim.swaps[cause] += 1
        finally:
            victim.draining = False
            self._dispatch()  # requests that came for the victim meanwhile may load it again

    async def _drain(self, record: ModelRecord) -> None:
        """Wait (up to drain_timeout) for the requests in flight to finish."""
        if record.in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.drain_timeout):
                    await record.drained.wait()

    def _start_failed(self, record: ModelRecord, error: ModelError) -> None:
        """A start failed: waiters learn why at once; a retry after backoff, or failed for good."""
        if isinstance(error, ModelStoppedError):
            if not record.draining:
                self._fail_waiters(record, error)
            # else an unload or a reload stopped it: its waiters wait for what comes next
            return
        self._fail_waiters(record, error if isinstance(error, ModelStartError)
                           else ModelStartError(str(error)))
        self._schedule_restart(record, uptime=None)

    def _on_exit(self, model: ManagedModel, uptime: float | None) -> None:
        """A ready server exited or hung: not leasable already; restart after backoff."""
        record = self._records[model.name]
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
        record.restart_timer = self._spawn(self._restart_after(record, delay))

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
    ) -> None:
        """Apply a reloaded config: models in `replace` are new or changed (a changed one is
        drained and stopped first; its waiting requests move to the new server), `remove`d
        ones are drained and stopped; every other model and its server is left alone."""
        if max_loaded is not None:
            self.max_loaded = max_loaded
        if max_wait is not None:
            self.max_wait = max_wait
        if ram_budget is not None:
            self._ram_budget = ram_budget
        if ram_reserve is not None:
            self._ram_reserve = ram_reserve
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
            managed.on_exit = self._on_exit
            managed.on_measured = self.record_measurement
            self._records[meta.name] = record
            if old is not None and old.meta.measurement_key != meta.measurement_key:
                self._measured.pop(meta.name, None)
        self._publish_names()
        for meta, _, _ in replace:
            if meta.preload:
                self._spawn(self._preload_quietly(meta.name))
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
        # always: a client's keep_alive (set_idle_timeout) may give any model a ttl later
        self._spawn(self._unload_idle(ttl_interval))

    def set_idle_timeout(self, name: str, seconds: float | None) -> None:
        """A client's keep_alive for `name` (the Ollama API): unload once idle that long
        (< 0: never); None: lalo.yaml's ttl again. The idle unload
        below applies it, like the ttl it overrides."""
        # a negative keep_alive is a ttl of 0: never unloaded for being idle
        self._records[name].idle_timeout = None if seconds is None else max(seconds, 0.0)

    async def _unload_idle(self, interval: float) -> None:
        while True:
            await self._sleep(interval)
            now = self._clock()
            for record in list(self._records.values()):
                meta, model, ttl = record.meta, record.model, record.ttl
                if (ttl > 0 and record.grantable and not record.busy
                        and now - max(record.last_used, model.started_at or 0.0) >= ttl):
                    record.idle_timeout = None  # spent: the next load starts with the ttl
                    log.info("%s: idle for %g s (ttl), unloading", meta.name, ttl)
                    await self.unload(meta.name, f"idle for {ttl:g} s (ttl)")

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("supervisor: internal error", exc_info=task.exception())

    async def close(self) -> None:
        """Refuse new work, then stop every server in parallel and wait until all have exited."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.cancel()
        for record in self._records.values():
            self._fail_waiters(record, ModelStoppedError(f"{record.name}: lalo is shutting down"))
            self._cancel_restart(record)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(r.model.close() for r in self._records.values()),
                             return_exceptions=True)

    # --- reporting ----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, ModelSnapshot]:
        """Every model as it is now, in config order: immutable copies, safe to keep."""
        return {name: self._snapshot(record) for name, record in self._records.items()}

    def _snapshot(self, record: ModelRecord) -> ModelSnapshot:
        meta, model, waits = record.meta, record.model, record.waits
        return ModelSnapshot(
            name=meta.name, aliases=meta.aliases, engine=meta.engine, path=meta.path,
            log_path=model.log.path, ttl=record.ttl, estimate=meta.estimate,
            required=self.required(meta.name), ctx_size=model.settings.ctx_size,
            state=str(model.reported_state), lifecycle=str(model.state),
            endpoint=model.endpoint, rss=model.rss, in_flight=record.in_flight,
            queued=len(record.queue),
            idle_since=max(record.last_used, model.started_at or 0.0),
            requests=record.requests, completion_tokens=record.completion_tokens,
            loads=record.loads, evictions=record.evictions, restarts=record.restarts,
            swaps_idle=record.swaps["idle"], swaps_max_wait=record.swaps["max_wait"],
            wait_buckets=tuple(waits.buckets), wait_count=waits.count, wait_total=waits.total,
        )

    def status(self) -> list[dict[str, Any]]:
        rows = []
        now = self._clock()
        for name, record in self._records.items():
            meta = record.meta
            recent = [rate for at, rate in record.token_rates if time.time() - at < 300]
            rows.append({
                "name": name,
                "aliases": list(meta.aliases),
                "engine": meta.engine,
                "file": meta.path,
                "synthetic": meta.synthetic,
                "preload": meta.preload,
                "pinned": meta.pinned,
                "ram_estimate": meta.estimate,
                "ctx_size": meta.ctx_size, "parallel": meta.parallel, "kv_cache": meta.kv_cache,
                "ram_measured": self._measured.get(name),
                "requests": record.requests,
                "in_flight": record.in_flight,
                "queued": sum(1 for w in record.queue if w.slot),
                "waiting_reason": record.waiting_reason,
                "loading": self.is_loading(name),
                # how long the load under way has taken, against the last one (load_seconds)
                "loading_s": round(now - record.load_began, 1)
                if record.load_began is not None else None,
                "draining": record.draining,
                "completion_tokens": record.completion_tokens,
                "tokens_per_s": round(recent[-1], 1) if recent else None,
                "tokens_per_s_history": [round(rate, 1) for rate in recent[-30:]],
                **record.model.snapshot(),
                "restarts": record.restarts,
                "failures": record.policy.failures,
                "max_failures": record.policy.max_failures,
                "restart_in_s": round(max(0.0, record.restart_at - now), 1)
                if record.restart_at is not None else None,
                "loads": record.loads,
                "wakes": record.wakes,
                "evictions": record.evictions,
            })
        return rows


class _LocalRequest:
    """A request for a slot on a server this lalo runs (see `Supervisor.lease`)."""

    __slots__ = ("_record", "_supervisor")

    def __init__(self, supervisor: Supervisor, record: ModelRecord) -> None:
        self._supervisor = supervisor
        self._record = record

    async def __aenter__(self) -> LocalLease:
        return await self._supervisor._acquire(self._record)

    async def __aexit__(self, *exc: object) -> None:
        self._supervisor._release(self._record)

    def waiting_for(self) -> str:
        return "queued for" if self._record.state == ModelState.READY else "loading"


class SupervisorEvents(ProcessEvents):
    """Wires ManagedModel hooks to the records of child processes (for reaping after a crash)."""

    def __init__(self, on_spawn: Callable[[str, int, float, int], None],
                 on_exit: Callable[[str, int], None]) -> None:
        self._on_spawn = on_spawn
        self._on_exit = on_exit

    def spawned(self, name: str, pid: int, created: float, port: int) -> None:
        self._on_spawn(name, pid, created, port)

    def exited(self, name: str, pid: int) -> None:
        self._on_exit(name, pid)


def model_error_status(exc: ModelError) -> int:
    """HTTP status the proxy answers for a model error."""
    if isinstance(exc, QueueFullError):
        return 429
    return 503
