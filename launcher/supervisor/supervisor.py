"""The supervisor: owns every ManagedModel, admits loads within the RAM budget, evicts idle ones.

Callers (the proxy, admin routes) never read a model's state and then act on it; they
call `lease()` (requests), `load()`, `unload()` or `restart()`, and the supervisor
decides under its admission lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from launcher.errors import CapacityError, ModelError, QueueFullError
from launcher.planner import Budget, Loaded, choose_evictions, compute_budget
from launcher.supervisor.process import Endpoint, ManagedModel, ModelState, ProcessEvents
from launcher.units import format_size

log = logging.getLogger(__name__)

# sched hook: a sleeping server holds its (small, measured) RSS
_HOLDS_MEMORY = (ModelState.STARTING, ModelState.READY, ModelState.SLEEPING, ModelState.STOPPING)


@dataclass
class ModelUsage:
    """Request accounting for one model; only the supervisor changes it."""

    slots: asyncio.Semaphore
    parallel: int
    queue_size: int
    in_flight: int = 0
    waiting: int = 0
    requests: int = 0
    last_used: float = 0.0
    completion_tokens: int = 0
    token_rates: list[tuple[float, float]] = field(default_factory=list)  # (wall time, tok/s)

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.waiting > 0


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


class Supervisor:
    def __init__(
        self,
        models: Sequence[tuple[SupervisedModel, ManagedModel]],
        *,
        ram_budget: int | str = "auto",
        ram_reserve: int = 1024**3,
        max_loaded: int = 0,
        queue_size: int = 64,
        measured: Mapping[str, int] | None = None,
        on_measured: Callable[[str, int], None] | None = None,
        available_memory: Callable[[], int] = lambda: int(psutil.virtual_memory().available),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.info = {meta.name: meta for meta, _ in models}
        self.models = {meta.name: managed for meta, managed in models}
        self.usage = {
            meta.name: ModelUsage(
                slots=asyncio.Semaphore(managed.settings.parallel),
                parallel=managed.settings.parallel,
                queue_size=queue_size,
            )
            for meta, managed in models
        }
        self._names = {alias: meta.name for meta, _ in models for alias in (meta.name, *meta.aliases)}
        self._measured = dict(measured or {})
        self._on_measured = on_measured
        self._ram_budget = ram_budget
        self._ram_reserve = ram_reserve
        self.max_loaded = max_loaded
        self._available = available_memory
        self._clock = clock
        self._admission = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started_at = clock()
        self.evictions: dict[str, int] = dict.fromkeys(self.models, 0)
        self.loads: dict[str, int] = dict.fromkeys(self.models, 0)

    # --- names --------------------------------------------------------------------------------
    def resolve(self, name: str) -> str | None:
        return self._names.get(name)

    def names_and_aliases(self) -> list[str]:
        return list(self._names)

    # --- memory -------------------------------------------------------------------------------
    def required(self, name: str) -> int:
        """What `name` needs: its measured peak RSS when known, else the estimate."""
        return self._measured.get(name) or self.info[name].estimate

    def budget(self) -> Budget:
        """The budget now; `auto` follows available RAM (counting our own servers as reclaimable)."""
        ours = sum(
            (self.models[n].rss or self.required(n))
            for n in self.models if self.models[n].state in _HOLDS_MEMORY
        )
        return compute_budget(self._ram_budget, self._ram_reserve, self._available() + ours)

    def record_measurement(self, name: str, rss: int) -> None:
        if rss > self._measured.get(name, 0):
            self._measured[name] = rss
            if self._on_measured is not None:
                self._on_measured(name, rss)

    # --- starting -----------------------------------------------------------------------------
    async def start_preloads(self, names: Sequence[str]) -> dict[str, BaseException | None]:
        """Start the planned preload models in parallel; returns each one's error or None."""
        results = await asyncio.gather(*(self.load(name) for name in names), return_exceptions=True)
        outcome: dict[str, BaseException | None] = {}
        for name, result in zip(names, results, strict=True):
            outcome[name] = result if isinstance(result, BaseException) else None
        return outcome

    async def load(self, name: str) -> Endpoint:
        """Make `name` ready, evicting least recently used idle models if RAM is short."""
        model = self.models[name]
        if model.state == ModelState.READY and model.endpoint is not None:
            return model.endpoint
        async with self._admission:
            # a model being stopped (unload, eviction) is let finish, then admitted afresh
            await model.wait_stopped()
            if model.state == ModelState.STOPPED:
                for victim in self._make_room(name):
                    log.info("%s: unloading %s to make room", name, victim)
                    await self.models[victim].stop(f"unloaded to make room for {name}")
                    self.evictions[victim] += 1
                self.loads[name] += 1
            elif model.state == ModelState.SLEEPING:
                # sched hook: this request wakes it to its full size, so a wake is admitted
                # like a load (victims by the same rule), then it counts as awake
                for victim in self._make_room(name):
                    log.info("%s: unloading %s to make room for waking", name, victim)
                    await self.models[victim].stop(f"unloaded to make room for {name}")
                    self.evictions[victim] += 1
                model.mark_awake()
            outcome = model.start_soon()  # starting before we let go of the lock
        if outcome is not None:
            await asyncio.shield(outcome)
        return await model.ensure_ready()

    def _make_room(self, name: str) -> list[str]:
        """The idle models to unload so `name` fits, or CapacityError with the figures."""
        budget = self.budget()
        others = [
            Loaded(
                other,
                self.models[other].rss or self.required(other),
                self.usage[other].last_used,
                self.usage[other].busy,
                self.info[other].preload,
            )
            for other in self.models
            if other != name and self.models[other].state in _HOLDS_MEMORY
        ]
        needed = self.required(name)
        victims = choose_evictions(others, budget.bytes, needed, self.max_loaded)
        if victims is None:
            used = sum(o.required for o in others)
            pinned = [o.name for o in others if o.busy or o.pinned]
            raise CapacityError(
                f"{name} needs {format_size(needed)}; budget {format_size(budget.bytes)} "
                f"({budget.source}), {format_size(used)} held by running models"
                + (f" that cannot be unloaded now ({', '.join(pinned)}: busy or preload)"
                   if pinned else "")
                + (f"; max_loaded={self.max_loaded}" if self.max_loaded else "")
            )
        return victims

    async def unload(self, name: str, reason: str = "unload requested") -> None:
        await self.models[name].stop(reason)

    async def restart(self, name: str) -> Endpoint:
        model = self.models[name]
        await model.stop("restart requested")
        model.policy.reset()
        return await self.load(name)

    # --- requests -----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Endpoint]:
        """Hold one of `name`'s slots for one request: loads it, queues within limits, marks busy."""
        usage = self.usage[name]
        if usage.in_flight >= usage.parallel and usage.waiting >= usage.queue_size:
            raise QueueFullError(
                f"{name}: {usage.in_flight} requests running and {usage.waiting} queued "
                f"(queue_size {usage.queue_size})"
            )
        usage.waiting += 1
        usage.last_used = self._clock()
        acquired = False
        try:
            endpoint = await self.load(name)
            await usage.slots.acquire()
            acquired = True
            usage.waiting -= 1
            usage.in_flight += 1
            usage.requests += 1
            # the model may have restarted while we queued: take the current endpoint
            current = self.models[name].endpoint
            yield current or endpoint
        finally:
            if acquired:
                usage.in_flight -= 1
                usage.slots.release()
            else:
                usage.waiting -= 1
            usage.last_used = self._clock()

    def record_tokens(self, name: str, tokens: int, seconds: float) -> None:
        usage = self.usage[name]
        usage.completion_tokens += tokens
        if tokens > 0 and seconds > 0:
            usage.token_rates.append((time.time(), tokens / seconds))
            del usage.token_rates[:-60]

    # --- background ---------------------------------------------------------------------------
    def start_background(self, ttl_interval: float = 1.0) -> None:
        if any(meta.ttl > 0 for meta in self.info.values()):
            self._spawn(self._unload_idle(ttl_interval))

    async def _unload_idle(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            now = self._clock()
            for name, meta in self.info.items():
                usage = self.usage[name]
                model = self.models[name]
                # sched hook: a sleeping model's ttl still ends its process
                if (meta.ttl > 0 and model.state in (ModelState.READY, ModelState.SLEEPING)
                        and not usage.busy
                        and now - max(usage.last_used, model.started_at or 0.0) >= meta.ttl):
                    log.info("%s: idle for %.0f s (ttl), unloading", name, meta.ttl)
                    await model.stop(f"idle for {meta.ttl:g} s (ttl)")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop every server in parallel and wait until all have exited."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(m.close() for m in self.models.values()), return_exceptions=True)

    # --- reporting ----------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        rows = []
        for name, model in self.models.items():
            meta = self.info[name]
            usage = self.usage[name]
            recent = [rate for at, rate in usage.token_rates if time.time() - at < 300]
            rows.append({
                "name": name,
                "aliases": list(meta.aliases),
                "engine": meta.engine,
                "file": meta.path,
                "synthetic": meta.synthetic,
                "preload": meta.preload,
                "ram_estimate": meta.estimate,
                "ram_measured": self._measured.get(name),
                "requests": usage.requests,
                "in_flight": usage.in_flight,
                "queued": usage.waiting,
                "completion_tokens": usage.completion_tokens,
                "tokens_per_s": round(recent[-1], 1) if recent else None,
                "tokens_per_s_history": [round(rate, 1) for rate in recent[-30:]],
                **model.snapshot(),
            })
        return rows


class SupervisorEvents(ProcessEvents):
    """Wires ManagedModel hooks to child records and memory measurements."""

    def __init__(self, on_spawn: Callable[[str, int, float, int], None],
                 on_exit: Callable[[str, int], None],
                 on_measure: Callable[[str, int], None]) -> None:
        self._on_spawn = on_spawn
        self._on_exit = on_exit
        self._on_measure = on_measure

    def spawned(self, name: str, pid: int, created: float, port: int) -> None:
        self._on_spawn(name, pid, created, port)

    def exited(self, name: str, pid: int) -> None:
        self._on_exit(name, pid)

    def measured(self, name: str, rss: int) -> None:
        self._on_measure(name, rss)


def model_error_status(exc: ModelError) -> int:
    """HTTP status the proxy answers for a model error."""
    if isinstance(exc, QueueFullError):
        return 429
    return 503
