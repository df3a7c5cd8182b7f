"""What the supervisor keeps per model: its static facts, its live record (queue, counters,
load and restart marks) and the view of it the scheduler decides on. Only the supervisor
changes a record; the proxy sees snapshots (`launcher.supervisor.snapshot`)."""

from __future__ import annotations

import asyncio
import bisect
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from launcher.config.request_params import RequestRules
from launcher.models.capabilities import Capabilities
from launcher.placement.scheduler import ModelView
from launcher.supervisor.policy import RestartPolicy
from launcher.supervisor.process import ManagedModel
from launcher.supervisor.state import Endpoint, ModelState

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
    # its threads follow what is busy (launcher/supervisor/governor.py): a lalo-built
    # llama-server with `threads: auto`; else the static policy of placement/cpu_share.py
    governed: bool = False
    # non-streamed generations are asked of its server as streams and put back together
    # (launcher/proxy/assemble.py): a llama-server without lalo's patch 0004 notices a client
    # that left only on a stream while other requests generate
    assembles: bool = False
    # what it can serve (from its GGUF and settings): None, not known, nothing is refused
    capabilities: Capabilities | None = None


@dataclass
class Waiter:
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
    queue: deque[Waiter] = field(default_factory=deque)
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

    def holds(self, required: int) -> int:
        """What it counts for in admission (`required`: its measured peak, else its estimate):
        a fresh server grows to what it needs; a sleeping one holds what it measures (its
        weights are freed) until its wake is admitted (`must_wake`), which counts it at full
        size again."""
        if self.model.asleep and not self.wake_admitted and self.model.rss:
            return self.model.rss
        return max(self.model.rss or 0, required)

    def view(self, required: int, clock: Callable[[], float]) -> ModelView:
        """What the scheduler decides on (`launcher.placement.scheduler`)."""
        waiting = [w.since for w in self.queue]
        queued = len(self.queue) + (1 if self.restart_due else 0)
        if self.draining and not self.resident:
            queued = 0  # an unload under way: do not bring it back before it is done
        if self.must_wake:  # to the scheduler, a load of its full size
            return ModelView(
                name=self.name, required=required, resident=False,
                evictable=False, in_flight=0, queued=queued, oldest_wait=min(waiting),
                pinned=self.meta.pinned, last_used=self.last_used,
                load_seconds=self.model.load_seconds, failed=False, ready_since=None)
        return ModelView(
            name=self.name,
            required=self.holds(required),
            resident=self.resident,
            evictable=(self.state == ModelState.READY and not self.draining
                       and not self.loading),
            in_flight=self.in_flight,
            queued=queued,
            oldest_wait=min(waiting) if waiting else (clock() if queued else None),
            pinned=self.meta.pinned,
            last_used=self.last_used,
            load_seconds=self.model.load_seconds,
            failed=self.failed_for_good,
            ready_since=self.model.started_at,
        )
