"""The supervisor's races and scheduling, driven with its constructor hooks.

A fake clock (max_wait decisions), a fake probe (a server is ready when the test says so),
a spawner that records every start (the processes are real `sleep`s, so that signals,
exits and reaping are real) and a gated sleep (restart backoff ends when the test says so).
Each scenario is one of the races the review found in the old supervisor.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from launcher.engines.base import LaunchSpec, ServerSettings, base_url
from launcher.errors import (
    CapacityError,
    ModelFailedError,
    ModelStartError,
    ModelStoppedError,
    QueueFullError,
)
from launcher.supervisor import platform
from launcher.supervisor.events import SupervisorEvents
from launcher.supervisor.logs import ModelLog
from launcher.supervisor.policy import RestartPolicy
from launcher.supervisor.process import Endpoint, ManagedModel, ModelState, Timeouts
from launcher.supervisor.supervisor import SupervisedModel, Supervisor

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses `sleep` processes")

MIB = 1024**2


@dataclass(frozen=True)
class SleepEngine:
    kind: str = "fake"

    def launch_spec(self, settings: ServerSettings) -> LaunchSpec:
        return LaunchSpec(argv=("sleep", "600"), env={},
                          base_url=base_url(settings.host, settings.port),
                          ready_path="/health", health_path="/health", health_needs_key=False)


@dataclass
class Harness:
    tmp_path: Path
    now: float = 0.0
    not_ready: set[str] = field(default_factory=set)  # models whose servers never get ready
    spawned: list[tuple[str, asyncio.subprocess.Process]] = field(default_factory=list)
    overlap: list[str] = field(default_factory=list)  # starts while another server still ran
    backoff_over: asyncio.Event = field(default_factory=asyncio.Event)
    ports: itertools.count[int] = field(default_factory=lambda: itertools.count(41000))
    port_owner: dict[int, str] = field(default_factory=dict)
    supervisor: Supervisor | None = None
    events: SupervisorEvents = field(default_factory=SupervisorEvents)

    def clock(self) -> float:
        return self.now

    async def probe(self, url: str, headers: Mapping[str, str], within: float) -> int:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        return 503 if self.port_owner.get(port) in self.not_ready else 200

    def spawner_for(self, name: str, exclusive: bool) -> Callable[[LaunchSpec], object]:
        async def spawn(spec: LaunchSpec) -> asyncio.subprocess.Process:
            live = [n for n, p in self.spawned if p.returncode is None]
            if exclusive and live:
                self.overlap.append(f"{name} started while {live} ran")
            process = await platform.spawn(spec.argv, spec.env)
            self.spawned.append((name, process))
            return process
        return spawn

    def allocate(self, name: str) -> Callable[[str], int]:
        def port(host: str) -> int:
            number = next(self.ports)
            self.port_owner[number] = name
            return number
        return port

    async def sleep(self, delay: float) -> None:
        await self.backoff_over.wait()

    def build(self, names: tuple[str, ...] = ("a", "b"), *, required: int = 100 * MIB,
              sizes: Mapping[str, int] | None = None,
              budget: int = 150 * MIB, max_loaded: int = 0, parallel: int = 1,
              max_wait: float = 10.0, queue_size: int = 8,
              pinned: tuple[str, ...] = ()) -> Supervisor:
        entries = [self.make(name, sizes.get(name, required) if sizes else required,
                             parallel, exclusive=budget < 2 * required, pinned=name in pinned)
                   for name in names]
        self.supervisor = Supervisor(
            [(meta, model) for meta, model, _ in entries], ram_budget=budget,
            max_loaded=max_loaded, queue_size=queue_size,
            max_wait=max_wait, wait_timeout=20.0, drain_timeout=10.0,
            policies={meta.name: policy for meta, _, policy in entries},
            # a `sleep` is smaller than any model: its RSS must not become the measured figure
            measured={n: (sizes or {}).get(n, required) for n in names},
            available_memory=lambda: 64 * 1024**3, total_memory=lambda: 64 * 1024**3,
            clock=self.clock, sleep=self.sleep, events=self.events,
        )
        return self.supervisor

    def make(self, name: str, required: int = 100 * MIB, parallel: int = 1, *,
             exclusive: bool = False, pinned: bool = False, ctx_size: int = 512,
             ) -> tuple[SupervisedModel, ManagedModel, RestartPolicy]:
        settings = ServerSettings(model_path=self.tmp_path / f"{name}.gguf", host="127.0.0.1",
                                  port=0, api_key="", ctx_size=ctx_size, parallel=parallel,
                                  threads=None)
        model = ManagedModel(
            name, SleepEngine(), settings, ModelLog(self.tmp_path / f"{name}.log"),
            probe=self.probe, spawner=self.spawner_for(name, exclusive=exclusive),
            port_allocator=self.allocate(name), clock=self.clock,
            timeouts=Timeouts(load_timeout=5.0, health_interval=0.05, liveness_timeout=5.0,
                              stop_timeout=2.0, probe_interval=0.01),
            events=self.events.for_model(name, f"{name}:{ctx_size}"),
        )
        meta = SupervisedModel(name=name, aliases=(), engine="fake", estimate=required,
                               preload=False, ttl=0, path=str(settings.model_path),
                               pinned=pinned, measurement_key=f"{name}:{ctx_size}")
        return meta, model, RestartPolicy(initial_delay=1, max_failures=3)

    def alive(self, name: str) -> list[int]:
        return [p.pid for n, p in self.spawned if n == name and p.returncode is None]


class Request:
    """One request that holds its lease until `done()`; records what it got."""

    def __init__(self, supervisor: Supervisor, name: str, log: list[str] | None = None) -> None:
        self.name = name
        self.endpoint: Endpoint | None = None
        self._finish = asyncio.Event()
        self._log = log
        self.task = asyncio.ensure_future(self._run(supervisor))

    async def _run(self, supervisor: Supervisor) -> Endpoint:
        async with supervisor.lease(self.name) as lease:
            endpoint = self.endpoint = lease.endpoint
            if self._log is not None:
                self._log.append(self.name)
            await self._finish.wait()
            return endpoint

    @property
    def granted(self) -> bool:
        return self.endpoint is not None

    async def done(self) -> Endpoint:
        self._finish.set()
        return await self.task


async def until(condition: Callable[[], object], limit: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting for a condition")
        await asyncio.sleep(0.005)


@pytest.fixture
async def harness(tmp_path: Path):  # type: ignore[no-untyped-def]
    made = Harness(tmp_path)
    yield made
    if made.supervisor is not None:
        await made.supervisor.close()
    for _, process in made.spawned:
        assert process.returncode is not None, "a server outlived the supervisor"


async def test_a_request_for_an_eviction_victim_never_gets_the_dying_server(
    harness: Harness
) -> None:
    # main: victims were chosen and then stopped with awaits in between; a request for the
    # victim took the lock-free path, got its endpoint and was killed mid-stream
    sup = harness.build(max_loaded=1)
    first_a = await sup.load("a")
    b = Request(sup, "b")
    await asyncio.sleep(0)  # b's lease runs up to its first await
    assert sup.record("a").draining  # the victim is marked before the swap's first await
    late_a = Request(sup, "a")
    await until(lambda: b.granted)
    await asyncio.sleep(0.05)
    assert not late_a.granted  # it waits for b's batch instead of leasing the dying server
    assert harness.alive("a") == []
    await b.done()
    await until(lambda: late_a.granted)
    assert late_a.endpoint is not None and late_a.endpoint.pid != first_a.pid
    await late_a.done()
    assert harness.overlap == []
    assert sup.record("a").swaps["idle"] == 1


async def test_a_crash_while_loading_fails_waiters_and_keeps_memory_for_the_retry(
    harness: Harness
) -> None:
    sup = harness.build()
    harness.not_ready.add("a")
    a = Request(sup, "a")
    await until(lambda: harness.alive("a"))
    os.kill(harness.alive("a")[0], signal.SIGKILL)
    with pytest.raises(ModelStartError, match="exited while starting"):
        await a.task
    record = sup.record("a")
    assert record.restart_at is not None and record.resident and sup.is_loading("a")
    # the retry's memory is reserved: b does not fit beside it and waits (no 503)
    b = Request(sup, "b")
    await asyncio.sleep(0.05)
    assert not b.granted and not sup.record("b").loading
    assert sup.record("b").queue
    harness.not_ready.discard("a")
    harness.backoff_over.set()  # the retry passes admission, loads, and is idle: b evicts it
    await until(lambda: b.granted)
    assert sup.record("a").loads == 2 and sup.record("a").swaps["idle"] == 1
    await b.done()
    assert harness.overlap == []


async def test_a_restart_after_a_crash_passes_admission_and_waiters_get_the_new_server(
    harness: Harness
) -> None:
    # main: a crashed model counted for no memory while its restart (started outside the
    # supervisor) was pending, so another model was admitted into the memory it then took
    sup = harness.build()
    first = await sup.load("a")
    os.kill(first.pid, signal.SIGKILL)
    await until(lambda: sup.models["a"].state == ModelState.FAILED)
    assert sup.models["a"].endpoint is None and sup.is_loading("a")  # at once, not after 2 s
    waiting_a = Request(sup, "a")  # waits for the restart: no 502 "unreachable"
    b = Request(sup, "b")
    await asyncio.sleep(0.05)
    assert not waiting_a.granted and not b.granted and not sup.record("b").loading
    harness.backoff_over.set()
    await until(lambda: waiting_a.granted)
    assert waiting_a.endpoint is not None and waiting_a.endpoint.pid != first.pid
    assert not b.granted  # a is busy: b waits for a's batch
    await waiting_a.done()
    await until(lambda: b.granted)
    await b.done()
    assert harness.overlap == []
    assert sup.record("a").restarts == 1


async def test_waiting_requests_are_served_in_batches_by_model(harness: Harness) -> None:
    sup = harness.build(max_loaded=1, budget=10 * 1024 * MIB)
    await sup.load("a")
    order: list[str] = []
    requests = [Request(sup, name, order) for name in ("a", "b", "a", "b", "a", "b")]
    await until(lambda: requests[0].granted)
    for _ in range(6):
        running = next(r for r in requests if r.granted and not r.task.done())
        await running.done()
        await until(lambda: all(r.task.done() for r in requests)
                    or any(r.granted and not r.task.done() for r in requests))
    assert order == ["a", "a", "a", "b", "b", "b"]
    assert sup.record("a").evictions == 1 and sup.record("b").evictions == 0


async def test_max_wait_bounds_a_batch_and_never_cuts_a_request(harness: Harness) -> None:
    sup = harness.build(max_loaded=1, budget=10 * 1024 * MIB, parallel=2, max_wait=10)
    await sup.load("a")
    a1 = Request(sup, "a")
    await until(lambda: a1.granted)
    b1 = Request(sup, "b")
    a2 = Request(sup, "a")
    await until(lambda: a2.granted)  # within max_wait: a keeps serving its own batch
    await a2.done()
    harness.now = 10.5
    sup.wake()
    a3 = Request(sup, "a")
    await asyncio.sleep(0.05)
    assert not a3.granted  # b has waited max_wait: a takes no new request although a slot is free
    assert harness.alive("a") and not b1.granted  # ... and its request in flight is not cut
    await a1.done()
    await until(lambda: b1.granted)
    assert sup.record("a").swaps["max_wait"] == 1
    await b1.done()
    await until(lambda: a3.granted)
    await a3.done()


async def test_a_cancelled_waiter_leaves_nothing_behind(harness: Harness) -> None:
    sup = harness.build(parallel=1)
    harness.not_ready.add("a")
    loading = Request(sup, "a")
    await until(lambda: sup.models["a"].state == ModelState.STARTING)
    row = next(r for r in sup.status() if r["name"] == "a")
    assert sup.is_loading("a") and row["loading"] and row["loading_s"] is not None
    loading.task.cancel()  # the client went away during the load
    with pytest.raises(asyncio.CancelledError):
        await loading.task
    record = sup.record("a")
    assert not record.queue and record.in_flight == 0
    harness.not_ready.discard("a")
    await until(lambda: sup.models["a"].state == ModelState.READY)
    # granted and cancelled in the same tick: the slot goes back
    async with sup.lease("a"):
        second = Request(sup, "a")
        await until(lambda: bool(record.queue))
    second.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second.task
    assert record.in_flight == 0 and not record.queue
    async with sup.lease("a") as lease:
        endpoint = lease.endpoint
        assert endpoint.pid == sup.models["a"].pid


async def test_only_a_model_that_can_never_fit_is_refused(harness: Harness) -> None:
    sup = harness.build(("big", "small", "p"), required=100 * MIB, budget=150 * MIB,
                        pinned=("p",), sizes={"big": 400 * MIB})
    with pytest.raises(CapacityError,
                       match=r"big needs 400 MiB; the RAM budget 150 MiB cannot hold it even"):
        async with sup.lease("big"):
            pass
    await sup.load("p")
    # small fits only where pinned p is: never, and it says who holds the memory
    with pytest.raises(CapacityError, match=r"held by pinned models \(p\)"):
        async with sup.lease("small"):
            pass


async def test_queue_full_and_shutdown(harness: Harness) -> None:
    sup = harness.build(queue_size=1)
    await sup.load("a")
    first = Request(sup, "a")
    await until(lambda: first.granted)
    queued = Request(sup, "a")
    await until(lambda: bool(sup.record("a").queue))
    with pytest.raises(QueueFullError, match="queue_size 1"):
        async with sup.lease("a"):
            pass
    await sup.close()
    with pytest.raises(ModelStoppedError):
        await queued.task
    assert harness.alive("a") == []


async def test_unload_drains_requests_in_flight_first(harness: Harness) -> None:
    sup = harness.build()
    await sup.load("a")
    running = Request(sup, "a")
    await until(lambda: running.granted)
    unloading = asyncio.ensure_future(sup.unload("a"))
    await until(lambda: sup.record("a").draining)
    later = Request(sup, "a")
    await asyncio.sleep(0.05)
    assert harness.alive("a") and not later.granted and not unloading.done()
    await running.done()
    await unloading
    await until(lambda: later.granted)  # it brought a back
    assert later.endpoint is not None and later.endpoint.pid != running.endpoint.pid  # type: ignore[union-attr]
    await later.done()


async def test_models_tell_their_supervisor_the_child_records_and_the_store(
        harness: Harness, tmp_path: Path) -> None:
    from launcher.placement.measurements import Measurements
    from launcher.supervisor.instance import ChildRecords

    children, store = ChildRecords(tmp_path), Measurements(tmp_path)
    harness.events = SupervisorEvents(children, store)
    sup = harness.build(("a",), budget=10 * 1024 * MIB)
    pid = (await sup.load("a")).pid
    assert children._records["a"]["pid"] == pid  # a lalo killed with -9 reaps it next time
    harness.events.for_model("a", "a:512").measured(500 * MIB)  # a new peak, as sampled
    assert sup.required("a") == 500 * MIB and store.get("a:512") == 500 * MIB
    await sup.unload("a")
    assert "a" not in children._records
    # a model not built with its supervisor's events would crash unheard: refused
    meta, model, _ = harness.make("b")
    with pytest.raises(ValueError, match="events"):
        Supervisor([(meta, model)])


async def test_reconfigure_restarts_only_what_changed(harness: Harness) -> None:
    sup = harness.build(("same", "changed", "gone"), budget=10 * 1024 * MIB)
    pids = {name: (await sup.load(name)).pid for name in ("same", "changed", "gone")}
    running = Request(sup, "changed")
    await until(lambda: running.granted)
    meta, model, policy = harness.make("changed", ctx_size=1024)
    meta = SupervisedModel(**{**meta.__dict__, "preload": True})
    added = harness.make("new")
    applying = asyncio.ensure_future(sup.reconfigure(
        replace=[(meta, model, policy), added], remove=["gone"], max_wait=3))
    await until(lambda: sup.record("changed").draining)
    waiting = Request(sup, "changed")  # comes while the old server drains
    await asyncio.sleep(0.05)
    assert harness.alive("changed") == [pids["changed"]]  # the request in flight is not cut
    await running.done()
    await applying
    assert sup.resolve("gone") is None and harness.alive("gone") == []
    assert sup.models["same"].pid == pids["same"]  # unchanged: same server
    await until(lambda: waiting.granted)
    assert waiting.endpoint is not None and waiting.endpoint.pid != pids["changed"]
    assert sup.models["changed"].settings.ctx_size == 1024
    await waiting.done()
    async with sup.lease("new") as lease:
        endpoint = lease.endpoint
        assert endpoint.pid in harness.alive("new")
    assert sup.max_wait == 3


def fall_asleep(model: ManagedModel, rss: int) -> None:
    """What the sleep probe and the memory sample would report: weights freed."""
    model._set_asleep(True)
    model.rss = rss


async def test_a_sleeping_model_counts_what_it_holds_and_its_wake_is_admitted_like_a_load(
    harness: Harness
) -> None:
    # main: a sleeping model counted at its full size, so b evicted it although its freed
    # weights left room for b; and its wake needed no admission
    sup = harness.build(budget=150 * MIB)
    a_first = await sup.load("a")
    fall_asleep(sup.models["a"], 5 * MIB)
    b = Request(sup, "b")
    await until(lambda: b.granted)
    assert harness.alive("a") == [a_first.pid]  # a sleeps on beside b: not evicted
    assert sup.record("a").evictions == 0
    # b busy: waking a needs its full 100 MiB, which only b's eviction frees: a waits
    fall_asleep(sup.models["a"], 5 * MIB)  # the memory sample ran again meanwhile
    a = Request(sup, "a")
    await asyncio.sleep(0.05)
    assert not a.granted and sup.models["a"].asleep
    assert "b" in (sup.record("a").waiting_reason or "")
    await b.done()
    await until(lambda: a.granted)
    assert a.endpoint is not None and a.endpoint.pid == a_first.pid  # woken, not restarted
    assert not sup.models["a"].asleep
    assert sup.record("b").evictions == 1 and harness.alive("b") == []
    await a.done()


async def test_a_sleeping_model_wakes_at_once_when_there_is_room(harness: Harness) -> None:
    sup = harness.build(budget=1024 * MIB)
    first = await sup.load("a")
    fall_asleep(sup.models["a"], 5 * MIB)
    a = Request(sup, "a")
    await until(lambda: a.granted)
    assert a.endpoint is not None and a.endpoint.pid == first.pid
    assert not sup.models["a"].asleep and not sup.record("a").wake_admitted
    await a.done()
    assert sup.record("a").loads == 1  # the wake is no load


async def test_a_server_killed_for_memory_is_not_restarted_into_memory_it_cannot_have(
    harness: Harness
) -> None:
    sup = harness.build(budget=150 * MIB)
    first = await sup.load("a")
    await until(lambda: sup.models["a"].run_peak is not None)
    sup.models["a"].run_peak = 200 * MIB  # it grew past the budget (a `sleep` cannot)
    os.kill(first.pid, signal.SIGKILL)  # from outside: the kernel's OOM killer, say
    await until(lambda: sup.models["a"].state == ModelState.FAILED)
    assert sup.required("a") == 200 * MIB  # its need is what it reached, before the restart
    waiting = Request(sup, "a")
    harness.backoff_over.set()
    with pytest.raises(ModelFailedError) as failed:
        await waiting.task
    assert str(failed.value) == (
        "a: failed: killed, most likely for memory: it had reached 200 MiB (SIGKILL); "
        "not restarted: "
        "a needs 200 MiB; the RAM budget 150 MiB cannot hold it even alone")
    row = next(row for row in sup.status() if row["name"] == "a")
    assert row["state"] == "failed" and row["ram_measured"] == 200 * MIB
    assert row["last_exit"] == "killed, most likely for memory: it had reached 200 MiB (SIGKILL)"
    assert [name for name, _ in harness.spawned] == ["a"]  # never started again: no loop
    with pytest.raises(ModelFailedError):  # until an explicit restart
        async with sup.lease("a"):
            pass
    assert harness.alive("b") == [] and sup.record("a").failed_for_good


def short_of_ram(harness: Harness, available: list[int], *, enabled: bool = True,
                 budget: int | str = "auto", total: int = 16 * 1024 * MIB) -> Supervisor:
    """a and b (100 MiB each) under `ram_budget: auto` (or `budget`), a 1 GiB reserve and the
    machine's available RAM read from `available[0]`; the periodic loop runs every 10 ms."""
    entries = [harness.make(name) for name in ("a", "b")]

    async def tick(delay: float) -> None:
        await asyncio.sleep(0.01)

    harness.supervisor = Supervisor(
        [(meta, model) for meta, model, _ in entries], ram_budget=budget, ram_reserve=1024 * MIB,
        max_wait=5.0, wait_timeout=20.0, yield_memory=enabled,
        measured={"a": 100 * MIB, "b": 100 * MIB},
        available_memory=lambda: available[0], total_memory=lambda: total,
        clock=harness.clock, sleep=tick, events=harness.events)
    harness.supervisor.start_background(ttl_interval=0.01)
    return harness.supervisor


async def test_ram_short_unloads_idle_models_and_loads_wait_for_it_to_come_back(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    available = [8 * 1024 * MIB]
    sup = short_of_ram(harness, available)
    await sup.load("a")
    await sup.load("b")
    busy = Request(sup, "b")  # b is busy: only a may go
    await until(lambda: busy.granted)
    caplog.set_level("WARNING")
    available[0] = 700 * MIB  # under the reserve: something else took the RAM
    await until(lambda: sup.models["a"].state == ModelState.STOPPED)
    assert ("RAM short: 700 MiB available, under the reserve 1.00 GiB: unloading idle a "
            "(100 MiB)") in caplog.text
    await asyncio.sleep(0.05)
    assert sup.models["b"].state == ModelState.READY  # in use: never cut
    await busy.done()
    await until(lambda: sup.models["b"].state == ModelState.STOPPED)
    # a request waits (max_wait) for RAM to come back, then is refused with the figures
    waiting = Request(sup, "a")
    await asyncio.sleep(0.05)
    assert not waiting.task.done() and sup.record("a").waiting_reason
    assert "RAM is short" in (sup.record("a").waiting_reason or "")
    harness.now += 5.0
    sup.wake()
    with pytest.raises(CapacityError, match="a needs 100 MiB; the RAM budget 0 B cannot hold it"):
        await waiting.task
    assert len(harness.spawned) == 2  # no load started into RAM that is not there
    # RAM comes back while a request waits: the periodic check loads it
    again = Request(sup, "a")
    await asyncio.sleep(0.05)
    assert not again.granted
    available[0] = 8 * 1024 * MIB
    await until(lambda: again.granted)
    await again.done()


async def test_a_dedicated_server_unloads_nothing_when_ram_is_short(harness: Harness) -> None:
    available = [8 * 1024 * MIB]
    sup = short_of_ram(harness, available, enabled=False)
    await sup.load("a")
    available[0] = 100 * MIB
    await asyncio.sleep(0.2)  # twenty checks of the periodic loop
    assert sup.models["a"].state == ModelState.READY


async def test_in_a_pod_smaller_than_the_reserve_idle_models_stay_until_others_take_its_ram(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    # the k8s target's pod: a 300 MiB limit, a configured budget of 200 MiB, the default 1 GiB
    # reserve. The reserve can never be free there; yielding to it unloaded every idle model.
    available = [150 * MIB]  # lalo and a loaded: 150 MiB of the limit left
    sup = short_of_ram(harness, available, budget=200 * MIB, total=300 * MIB)
    assert sup.yield_floor() == 100 * MIB  # what the limit leaves beside the budget
    await sup.load("a")
    await asyncio.sleep(0.2)  # twenty checks of the periodic loop
    assert sup.models["a"].state == ModelState.READY
    caplog.set_level("WARNING")
    available[0] = 60 * MIB  # something else in the pod took its share: make room
    await until(lambda: sup.models["a"].state == ModelState.STOPPED)
    assert "RAM short: 60.0 MiB available, under the reserve 100 MiB: unloading idle a" in caplog.text
