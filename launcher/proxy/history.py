"""The last hour over time, for the dashboard's charts: a ring buffer sampled every few seconds.

Each sample holds, per model: requests/s, tokens/s, p50 and p95 latency of the requests that
ended in the interval, resident memory and queue length; and the RAM budget. Sampling reads
state that already exists (the supervisor's counters, the activity log) on a loop timer: no
task to own, nothing done per request.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable
from typing import Any

from launcher.proxy.activity import Activity
from launcher.supervisor.supervisor import Supervisor

DEFAULT_INTERVAL = 5.0  # seconds between samples
DEFAULT_SPAN = 3600.0  # seconds kept


class Ring:
    """At most `capacity` items, oldest dropped first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a ring holds at least 1 item, got {capacity}")
        self.capacity = capacity
        self._items: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)

    def append(self, item: dict[str, Any]) -> None:
        self._items.append(item)

    def __len__(self) -> int:
        return len(self._items)

    def items(self, since: float | None = None) -> list[dict[str, Any]]:
        """Oldest first; with `since`, only those taken after that time."""
        if since is None:
            return list(self._items)
        return [item for item in self._items if item["t"] > since]


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile (`share` from 0 to 1) of unsorted values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1))
    return ordered[rank]


class History:
    def __init__(self, supervisor: Supervisor, activity: Activity, *,
                 interval: float = DEFAULT_INTERVAL, span: float = DEFAULT_SPAN,
                 clock: Callable[[], float] = time.time) -> None:
        self.supervisor = supervisor
        self.activity = activity
        self.interval = interval
        self.ring = Ring(max(1, round(span / interval)))
        self._clock = clock
        self._tokens: dict[str, int] = {}
        self._requests: dict[str, int] = {}
        self._last = clock()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Sample every `interval` on the running loop, from now on."""
        if self._timer is None:
            self._last = self._clock()
            self._tokens = {name: model.completion_tokens
                            for name, model in self.supervisor.snapshot().items()}
            self._requests = dict(self.activity.per_model)
            self._schedule()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self.sample()
        self._schedule()

    def sample(self) -> dict[str, Any]:
        """Take one sample now (the timer calls this) and keep it."""
        now = self._clock()
        elapsed = max(now - self._last, 1e-3)
        durations: dict[str, list[float]] = collections.defaultdict(list)
        for entry in self.activity.since(self._last):
            if entry.time + entry.duration <= now:
                durations[entry.model].append(entry.duration)
        models: dict[str, dict[str, Any]] = {}
        for name, model in self.supervisor.snapshot().items():
            tokens = model.completion_tokens
            done = durations.get(name, [])
            answered = self.activity.per_model[name]
            p50, p95 = percentile(done, 0.5), percentile(done, 0.95)
            models[name] = {
                "rps": round((answered - self._requests.get(name, 0)) / elapsed, 3),
                "tps": round(max(0, tokens - self._tokens.get(name, tokens)) / elapsed, 2),
                "p50": round(p50, 4) if p50 is not None else None,
                "p95": round(p95, 4) if p95 is not None else None,
                "rss": int(model.rss or 0),
                "queue": model.queued,
            }
            self._tokens[name] = tokens
            self._requests[name] = answered
        self._last = now
        sample = {"t": round(now, 3), "budget": self.supervisor.budget().bytes, "models": models}
        self.ring.append(sample)
        return sample
