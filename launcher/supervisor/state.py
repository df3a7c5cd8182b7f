"""One model server's lifecycle states, the transitions allowed between them, and what a
ready server hands out (its endpoint).

Transitions (each logged as `name: a -> b`):
    stopped -> starting -> ready -> stopping -> stopped
    starting -> failed (exit, timeout)    ready -> failed (crash, hang: at once, on exit)
    failed -> starting (the supervisor restarts it)    failed -> stopping -> stopped
    stopped -> failed (the model file is unusable: never started)

`sleeping` (llama-server's --sleep-idle-seconds) is a sub-state of `ready` that only the
server decides: it freed its weights and keeps its process. It is reported, never entered.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass


class ModelState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    SLEEPING = "sleeping"  # reported only: internally ready (see the module doc)
    STOPPING = "stopping"
    FAILED = "failed"


ALLOWED: dict[ModelState, frozenset[ModelState]] = {
    ModelState.STOPPED: frozenset({ModelState.STARTING, ModelState.FAILED}),
    ModelState.STARTING: frozenset({ModelState.READY, ModelState.FAILED, ModelState.STOPPING}),
    ModelState.READY: frozenset({ModelState.STOPPING, ModelState.FAILED}),
    ModelState.SLEEPING: frozenset(),  # never the internal state
    ModelState.STOPPING: frozenset({ModelState.STOPPED}),
    ModelState.FAILED: frozenset({ModelState.STARTING, ModelState.STOPPING}),
}


def check_transition(name: str, old: ModelState, new: ModelState) -> None:
    """AssertionError for a transition the table does not allow (a bug, never a user error)."""
    if new not in ALLOWED[old]:
        raise AssertionError(f"{name}: illegal transition {old} -> {new}")


@dataclass(frozen=True)
class Endpoint:
    """Where a ready server answers, and the key it wants."""

    base_url: str
    api_key: str
    pid: int
    host: str = "127.0.0.1"
    port: int = 0


@dataclass(frozen=True)
class Timeouts:
    load_timeout: float = 120.0
    health_interval: float = 2.0
    liveness_timeout: float = 10.0
    stop_timeout: float = 10.0
    probe_interval: float = 0.02  # readiness polling while starting (cheap; it is start-up latency)


class EndpointGone(asyncio.Event):
    """Set once an endpoint is no longer served; `reason` says why when its server went
    without being stopped (a crash, a kill for memory), for the requests that were on it."""

    def __init__(self) -> None:
        super().__init__()
        self.reason: str | None = None

    def withdraw(self, reason: str | None = None) -> None:
        if not self.is_set():
            self.reason = reason
            self.set()
