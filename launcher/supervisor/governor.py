"""The thread governor: sets each model server's compute threads from what is busy.

Servers built by lalo carry patch 0002 (`POST /threads`, applied between decode steps); for
them the governor keeps `launcher.placement.thread_share`'s split in force:
- a server that becomes busy is accounted at once (the others are lowered before its first
  step can oversubscribe the CPUs);
- one that goes idle is accounted after `settle` seconds, so the gaps between the requests of
  one conversation do not make the others' threads flap;
- every `interval` seconds it reads the CPU time other programs took (the machine's busy time
  less that of lalo's servers) and counts it as busy CPUs, smoothed.
A server that does not answer the route is left as it is and said once in the log; the next
change tries again. Servers lalo did not build are not governed (the static policy of
`launcher.placement.cpu_share` applies to them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import psutil

from launcher.placement.thread_share import ThreadShare, share_threads
from launcher.supervisor.localhttp import request_json
from launcher.supervisor.state import Endpoint

log = logging.getLogger(__name__)

Post = Callable[[Endpoint, int], Awaitable[None]]
"""(server, threads) -> sets them on it; raises on failure."""

SETTLE = 0.25  # seconds an idle server stays counted as busy
INTERVAL = 0.5  # seconds between readings of the CPU time of other programs
SMOOTHING = 0.6  # weight of the newest reading
HYSTERESIS = 0.75  # CPUs a smoothed reading must move from the count in use to change it


class OtherLoad:
    """CPUs other programs keep busy: the machine's busy CPU time less that of `ours`."""

    def __init__(self, cpus: int) -> None:
        self.cpus = cpus
        self.value = 0.0
        self._last: tuple[float, float, float] | None = None  # wall, machine busy, ours

    def sample(self, pids: Iterable[int]) -> float:
        now = time.monotonic()
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        ours = 0.0
        for pid in [*pids, None]:
            with contextlib.suppress(psutil.Error):
                cpu = psutil.Process(pid).cpu_times()
                ours += cpu.user + cpu.system + cpu.children_user + cpu.children_system
        if self._last is not None and now > self._last[0]:
            elapsed = now - self._last[0]
            others = max(0.0, (busy - self._last[1]) - (ours - self._last[2])) / elapsed
            self.value = SMOOTHING * min(others, self.cpus) + (1 - SMOOTHING) * self.value
        self._last = (now, busy, ours)
        return self.value


class ThreadGovernor:
    """One owner of the governed servers' thread counts; the supervisor tells it what is busy."""

    def __init__(self, cpus: int, post: Post, *, settle: float = SETTLE,
                 interval: float = INTERVAL, others: OtherLoad | None = None) -> None:
        self.cpus = cpus
        self._post = post
        self._settle = settle
        self._interval = interval
        self._others = others
        self._servers: dict[str, Endpoint] = {}  # governed and ready
        self._busy: set[str] = set()
        self._counted: set[str] = set()  # busy as the split sees it (idle ones leave late)
        self._applied: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._idle_timers: dict[str, asyncio.TimerHandle] = {}
        self._task: asyncio.Task[None] | None = None
        self.share: ThreadShare = share_threads([], [], cpus)

    # --- what the supervisor reports ----------------------------------------------------------
    def ready(self, name: str, endpoint: Endpoint) -> None:
        """A governed server is up (started, restarted): its count is set anew."""
        if self._servers.get(name) == endpoint:
            return
        self._servers[name] = endpoint
        self._applied.pop(name, None)
        self._kick()

    def gone(self, name: str) -> None:
        for table in (self._servers, self._applied):
            table.pop(name, None)
        self._busy.discard(name)
        self._counted.discard(name)
        self._kick()

    def busy(self, name: str, busy: bool) -> None:
        if name not in self._servers:
            return
        timer = self._idle_timers.pop(name, None)
        if timer is not None:
            timer.cancel()
        if busy:
            self._busy.add(name)
            if name not in self._counted:
                self._counted.add(name)
                self._kick()
            return
        self._busy.discard(name)
        self._idle_timers[name] = asyncio.get_running_loop().call_later(
            self._settle, self._went_idle, name)

    def _went_idle(self, name: str) -> None:
        self._idle_timers.pop(name, None)
        if name not in self._busy and name in self._counted:
            self._counted.discard(name)
            self._kick()

    def threads(self, name: str) -> int | None:
        """The count in force on `name`'s server (None: not governed, or not set yet)."""
        return self._applied.get(name)

    # --- the loop ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="thread-governor")

    async def stop(self) -> None:
        for timer in self._idle_timers.values():
            timer.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _kick(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        others = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            if self._others is not None:
                reading = self._others.sample([e.pid for e in self._servers.values()])
                # a whole CPU more or less, not a reading near a half, changes the split
                if abs(reading - others) >= HYSTERESIS:
                    others = float(round(reading))
            await self._apply(others)

    async def _apply(self, others: float) -> None:
        names = sorted(self._servers)
        share = share_threads(names, [n for n in names if n in self._counted], self.cpus, others)
        changes = {n: count for n, count in share.threads.items() if self._applied.get(n) != count}
        if share.busy != self.share.busy or share.others != self.share.others:
            log.debug("threads: %s", share.describe())
        self.share = share
        if not changes:
            return
        results = await asyncio.gather(*(self._post(self._servers[n], c) for n, c in changes.items()),
                                       return_exceptions=True)
        for (name, count), result in zip(changes.items(), results, strict=True):
            if isinstance(result, BaseException):
                if name in self._servers:
                    log.warning("%s: could not set its threads to %d: %s", name, count, result)
                self._applied.pop(name, None)
            elif name in self._servers:
                self._applied[name] = count


async def post_threads(endpoint: Endpoint, count: int) -> None:
    """`POST /threads` (patch 0002) on a server: generation and batch threads alike."""
    answer = await request_json("POST", f"{endpoint.base_url}/threads",
                                {"Authorization": f"Bearer {endpoint.api_key}"}, 2.0,
                                {"n_threads": count, "n_threads_batch": count})
    if answer.status != 200:
        raise RuntimeError(f"POST /threads answered {answer.status}: {answer.body!r}"[:300])
