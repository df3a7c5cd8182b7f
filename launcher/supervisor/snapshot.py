"""What the supervisor shows of one model: an immutable copy, for the proxy's status, metrics,
history and Ollama routes. Nothing outside the supervisor reads its live records."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launcher.models.capabilities import Capabilities
from launcher.supervisor.process import Endpoint


@dataclass(frozen=True)
class ModelSnapshot:
    """One model as it is at the moment `Supervisor.snapshot()` was called."""

    name: str
    aliases: tuple[str, ...]
    engine: str
    path: str  # the model file
    log_path: Path  # the server's log file (it exists once the server wrote a line)
    ttl: float  # idle seconds before an unload (0: never), an Ollama keep_alive included
    estimate: int
    required: int  # measured peak RSS when known, else the estimate
    ctx_size: int
    state: str  # as reported: `sleeping` while a ready server has freed its weights
    lifecycle: str  # the state the supervisor acts on (a sleeping server is `ready`)
    endpoint: Endpoint | None  # while ready
    rss: int | None
    in_flight: int
    queued: int  # waiters, requests and load calls
    idle_since: float  # clock() of the last use (or the start), for the idle unload
    requests: int
    completion_tokens: int
    loads: int
    evictions: int
    restarts: int
    swaps_idle: int
    swaps_max_wait: int
    wait_buckets: tuple[int, ...]  # the queue wait histogram (WAIT_BUCKETS)
    wait_count: int
    wait_total: float
    threads: int | None = None  # compute threads now (governed) or as started; None: default
    capabilities: Capabilities | None = None  # what it can serve; None: not known

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.queued > 0

    @property
    def serving(self) -> bool:
        """Ready and awake: its server answers now (a sleeping one is left asleep)."""
        return self.state == "ready" and self.endpoint is not None
