"""Admission: the one place that decides which model runs and which request waits.

Every decision is taken synchronously in `_dispatch()` (no await between looking and
acting), from the pure rules in `launcher.placement.scheduler`:

- first loads, on-demand loads and restarts after a crash (once their backoff is over) all
  go through the same admission; a model whose restart is pending keeps its memory; one
  whose restart can never fit (killed for memory, its need raised) is failed, not restarted;
- a request for a model that does not fit *now* waits in line (bounded by `wait_timeout`);
  only a model that can never fit is refused (CapacityError); one that misses an `auto`
  budget only while RAM is short waits `max_wait` for it to come back first;
- a loaded model serves its own queue while others wait (batch by model) until the oldest
  waiter has waited `max_wait`; then the models in its way take no new requests, finish
  the ones in flight, and are evicted. A victim is marked draining before the first await,
  so no request can lease it, and no request is ever cut to make room.

`Supervisor` (launcher.supervisor.supervisor) builds on it: restarts, admin calls, reloads,
the idle unload and reporting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from launcher.errors import (
    CapacityError,
    ModelError,
    ModelFailedError,
    ModelStartError,
    ModelStoppedError,
    QueueFullError,
    WaitTimeoutError,
)
from launcher.placement.planner import Budget, compute_budget
from launcher.placement.scheduler import Load, ModelView, Schedule, never_fits, schedule
from launcher.supervisor.governor import ThreadGovernor
from launcher.supervisor.lease import LeaseRequest, LocalLease
from launcher.supervisor.records import ModelRecord, Waiter
from launcher.supervisor.state import Endpoint, ModelState
from launcher.supervisor.tasks import Tasks

log = logging.getLogger(__name__)


class Admission:
    """Leases, the queues, loads and evictions over the supervisor's records.

    The state it decides on is set up by `Supervisor.__init__`; only `_schedule_restart`
    (what a failed start leads to) is the Supervisor's.
    """

    _records: dict[str, ModelRecord]
    _measured: dict[str, int]  # the highest RSS seen per model (else its estimate counts)
    _ram_budget: int | str
    _ram_reserve: int
    max_loaded: int
    max_wait: float
    wait_timeout: float | None
    drain_timeout: float
    _available: Callable[[], int]
    _total: Callable[[], int]
    _clock: Callable[[], float]
    _sleep: Callable[[float], Awaitable[None]]
    _tasks: Tasks
    _wakeup: asyncio.TimerHandle | None
    _closing: bool
    _closed: frozenset[str]  # models draining for a starved waiter
    governor: ThreadGovernor | None  # told when a model starts and stops being busy

    # --- memory -------------------------------------------------------------------------------
    def required(self, name: str) -> int:
        """What `name` needs: its measured peak RSS when known, else the estimate."""
        return self._measured.get(name) or self._records[name].meta.estimate

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

    # --- the views the scheduler decides on, refusals --------------------------------------------
    def _view_of(self, record: ModelRecord) -> ModelView:
        return record.view(self.required(record.name), self._clock)

    def _refusal(self, record: ModelRecord) -> ModelError | None:
        """Why a request for `record` is refused at once, or None (it may wait)."""
        if self._closing:
            return ModelStoppedError(f"{record.name}: lalo is shutting down")
        if record.failed_for_good:
            return ModelFailedError(f"{record.name}: failed: {record.model.last_error}")
        if record.resident:
            return None
        views = [self._view_of(r) for r in self._records.values()]
        why = never_fits(self._view_of(record), views, self.budget().bytes, self.max_loaded)
        if why is not None and not self._short_of_ram(record, self._clock()):
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
        return LocalLease(endpoint=endpoint, assembles=record.meta.assembles,
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
        waiter = Waiter(asyncio.get_running_loop().create_future(), now, slot)
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

    def _withdraw(self, record: ModelRecord, waiter: Waiter) -> None:
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
            if self.governor is not None:
                self.governor.busy(record.name, False)
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
            plan = schedule([self._view_of(r) for r in records], self.budget().bytes,
                            self.max_loaded, now, self.max_wait)
        else:
            plan = Schedule()  # everything wanted is loaded or loading: grants only
        self._closed = plan.closed
        waiting = list(plan.waiting)
        for name, why in plan.refused:
            self._refuse(self._records[name], why, now, waiting)
        for load in plan.loads:
            self._begin_load(load)  # marks its victims draining: granted nothing below
        for record in records:
            if record.grantable and record.name not in plan.closed:
                self._grant(record, now)
        for name, why in waiting:
            record = self._records[name]
            if record.waiting_reason != why:
                log.info("%s: %d request(s) wait: %s", name, len(record.queue), why)
            record.waiting_reason = why
        self._arm_wakeup(waiting, now)

    def _refuse(self, record: ModelRecord, why: str, now: float,
                waiting: list[tuple[str, str]]) -> None:
        """`record` does not fit the budget even alone: while that is only RAM being short
        now, its requests wait (max_wait) for RAM to come back; otherwise they are refused,
        and a crashed server that no longer fits is failed, not restarted in a loop."""
        if self._short_of_ram(record, now):
            waiting.append((record.name, f"{why}; RAM is short: waiting for it to come back"))
        elif record.restart_due:
            record.restart_due = False
            record.model.not_restarted(why)
            log.warning("%s: not restarted: %s", record.name, why)
            self._fail_waiters(record, ModelFailedError(
                f"{record.name}: failed: {record.model.last_error}"))
        elif self._ram_budget == "auto":  # say where the budget comes from: RAM short now
            self._fail_waiters(record, CapacityError(f"{why} ({self.budget().source})"))
        else:
            self._fail_waiters(record, CapacityError(why))

    def _short_of_ram(self, record: ModelRecord, now: float) -> bool:
        """Whether `record` misses an `auto` budget only because RAM is short now (it would fit
        the machine's RAM), and its oldest request has waited less than max_wait."""
        if self._ram_budget != "auto":
            return False
        oldest = min((w.since for w in record.queue), default=now)
        whole = compute_budget("auto", self._ram_reserve, self._total()).bytes
        return self._view_of(record).required <= whole and now - oldest < self.max_wait

    def _grant(self, record: ModelRecord, now: float) -> None:
        endpoint = record.model.endpoint
        assert endpoint is not None
        kept: deque[Waiter] = deque()
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
        if record.in_flight == 1 and self.governor is not None:
            self.governor.busy(record.name, True)
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
        self._tasks.spawn(self._load(record, victims, load.cause), f"load {load.name}")

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

    def _schedule_restart(self, record: ModelRecord, uptime: float | None) -> None:
        """A start failed or a ready server exited: the Supervisor's restart policy decides."""
        raise NotImplementedError


class _LocalRequest:
    """A request for a slot on a server this lalo runs (see `Supervisor.lease`)."""

    __slots__ = ("_record", "_supervisor")

    def __init__(self, supervisor: Admission, record: ModelRecord) -> None:
        self._supervisor = supervisor
        self._record = record

    async def __aenter__(self) -> LocalLease:
        return await self._supervisor._acquire(self._record)

    async def __aexit__(self, *exc: object) -> None:
        self._supervisor._release(self._record)

    def waiting_for(self) -> str:
        return "queued for" if self._record.state == ModelState.READY else "loading"

