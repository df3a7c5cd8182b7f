"""ManagedModel (one process and its state machine) against a small real fake-server process."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from launcher.engines.base import LaunchSpec, ServerSettings, base_url
from launcher.errors import ModelStartError, ModelStoppedError
from launcher.machine.limits import OomKills
from launcher.supervisor.events import NO_EVENTS, ProcessEvents
from launcher.supervisor.logs import ModelLog
from launcher.supervisor.policy import RestartPolicy
from launcher.supervisor.process import ManagedModel, ModelState, Timeouts

FAKE = Path(__file__).resolve().parent.parent / "support" / "fake_server.py"


@dataclass(frozen=True)
class FakeEngine:
    flags: Sequence[str] = ()
    kind: str = "fake"

    def launch_spec(self, settings: ServerSettings) -> LaunchSpec:
        return LaunchSpec(
            argv=(sys.executable, str(FAKE), "--port", str(settings.port), *self.flags),
            env={}, base_url=base_url(settings.host, settings.port),
            ready_path="/health", health_path="/health", health_needs_key=False,
        )


def make(tmp_path: Path, *flags: str, name: str = "m", events: ProcessEvents = NO_EVENTS,
         oom_kills: Callable[[], OomKills | None] = lambda: None,
         **timeouts: float) -> ManagedModel:
    settings = ServerSettings(model_path=tmp_path / "m.gguf", host="127.0.0.1", port=0,
                              api_key="", ctx_size=512, parallel=1, threads=None)
    return ManagedModel(
        name, FakeEngine(flags), settings, ModelLog(tmp_path / "m.log"),
        timeouts=Timeouts(**{"load_timeout": 10.0, "health_interval": 0.1,
                             "liveness_timeout": 1.0, "stop_timeout": 2.0, **timeouts}),
        events=events, oom_kills=oom_kills,
    )


class Heard:
    """ProcessEvents that keep what they are told."""

    def __init__(self, on_crash: Callable[[float | None], None] = lambda uptime: None) -> None:
        self.states: list[ModelState] = []
        self.peaks: list[int] = []
        self.out_of_memory_at: list[int] = []
        self.pids: list[tuple[str, int]] = []
        self._on_crash = on_crash

    def spawned(self, pid: int, created: float, port: int) -> None:
        self.pids.append(("spawned", pid))

    def changed(self, state: ModelState) -> None:
        self.states.append(state)

    def crashed(self, uptime: float | None) -> None:
        self._on_crash(uptime)

    def measured(self, rss: int) -> None:
        self.peaks.append(rss)

    def out_of_memory(self, rss: int) -> None:
        self.out_of_memory_at.append(rss)

    def reaped(self, pid: int) -> None:
        self.pids.append(("reaped", pid))


async def wait_for(condition: object, limit: float = 10.0) -> None:
    assert callable(condition)
    deadline = asyncio.get_running_loop().time() + limit
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


def test_restart_policy_backs_off_and_gives_up() -> None:
    policy = RestartPolicy(initial_delay=1, max_delay=30, max_failures=5, stable_after=60)
    assert [policy.on_failure(uptime=1) for _ in range(4)] == [1, 2, 4, 8]
    assert policy.on_failure(uptime=1) is None
    policy.reset()
    assert policy.on_failure(None) == 1
    assert policy.on_failure(uptime=61) == 1  # stayed up long enough: counting starts over
    capped = RestartPolicy(initial_delay=1, max_delay=3, max_failures=10)
    assert [capped.on_failure(None) for _ in range(4)] == [1, 2, 3, 3]


async def test_concurrent_callers_share_one_start(tmp_path: Path) -> None:
    model = make(tmp_path, "--ready-after", "0.5")
    try:
        endpoints = await asyncio.gather(*(model.start() for _ in range(5)))
        assert len({e.pid for e in endpoints}) == 1
        assert model.spawn_count == 1
        assert model.state == ModelState.READY
        assert model.load_seconds is not None and model.load_seconds >= 0.5
    finally:
        await model.close()
    assert model.state == ModelState.STOPPED


async def test_exit_while_starting_fails_at_once_with_code_and_log(
    tmp_path: Path
) -> None:
    model = make(tmp_path, "--ready-after", "30", "--exit-after", "0.3", "--exit-code", "7",
                 load_timeout=30)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(ModelStartError) as caught:
            await model.start()
        assert asyncio.get_running_loop().time() - started < 5  # not the 30 s load timeout
        message = str(caught.value)
        assert "exited while starting (exit code 7)" in message
        assert "fake: exiting with 7" in message
        assert model.state == ModelState.FAILED
    finally:
        await model.close()


async def test_load_timeout_kills_the_server(tmp_path: Path) -> None:
    model = make(tmp_path, "--ready-after", "60", load_timeout=0.5)
    try:
        with pytest.raises(ModelStartError, match=r"not ready within load_timeout=0.5 s; killed"):
            await model.start()
        assert model.pid is None
    finally:
        await model.close()


async def test_crash_after_ready_is_failed_at_once_and_not_restarted_by_itself(
    tmp_path: Path
) -> None:
    # the owner (the supervisor) decides restarts: the model only reports the exit, at once
    exits: list[tuple[ModelState, float | None, object]] = []
    heard = Heard(lambda uptime: exits.append((model.state, uptime, model.endpoint)))
    model = make(tmp_path, "--exit-after", "0.6", events=heard)
    try:
        pid = (await model.start()).pid
        await wait_for(lambda: bool(exits))
        state, uptime, endpoint = exits[0]
        assert state == ModelState.FAILED and endpoint is None  # not leasable from that moment
        assert uptime is not None and uptime > 0
        await wait_for(lambda: model.pid is None)
        assert "server exited (exit code 3)" in (model.last_error or "")
        assert heard.pids == [("spawned", pid), ("reaped", pid)]
        assert heard.states[-2:] == [ModelState.READY, ModelState.FAILED]
        assert model.spawn_count == 1 and model.state == ModelState.FAILED
        again = await model.start()  # only when told to
        assert again.pid != 0 and model.spawn_count == 2
    finally:
        await model.close()


async def test_stop_racing_an_exit_is_not_swallowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # today's main: the watcher swallowed stop()'s cancel while reaping and then tried an
    # illegal STOPPING -> FAILED transition (logged as an internal error)
    import psutil

    model = make(tmp_path, "--exit-after", "0.4")
    try:
        endpoint = await model.start()
        await wait_for(lambda: not psutil.pid_exists(endpoint.pid)
                       or psutil.Process(endpoint.pid).status() == psutil.STATUS_ZOMBIE)
        await model.stop("racing the exit")
        assert model.state == ModelState.STOPPED
        await asyncio.sleep(0.1)
    finally:
        await model.close()
    assert "illegal transition" not in caplog.text
    assert "internal error" not in caplog.text


async def test_a_server_that_ignores_sigterm_is_killed(
    tmp_path: Path
) -> None:
    model = make(tmp_path, "--ignore-term", stop_timeout=0.5)
    endpoint = await model.start()
    await model.stop("test")
    assert model.state == ModelState.STOPPED
    import psutil

    assert not psutil.pid_exists(endpoint.pid)
    assert "no exit 0.5 s after SIGTERM; killing" in (tmp_path / "m.log").read_text()
    await model.close()


async def test_stop_while_starting_wakes_waiters_and_leaves_no_process(
    tmp_path: Path
) -> None:
    model = make(tmp_path, "--ready-after", "30", load_timeout=60)
    waiter = asyncio.ensure_future(model.start())
    await wait_for(lambda: model.pid is not None)
    pid = model.pid
    await asyncio.gather(model.stop("test"), model.stop("twice is fine"))
    with pytest.raises(ModelStoppedError):
        await waiter
    import psutil

    assert pid is not None and not psutil.pid_exists(pid)
    await model.close()


async def test_a_model_marked_invalid_is_failed_until_started_again(tmp_path: Path) -> None:
    model = make(tmp_path)
    model.mark_invalid("not a GGUF file")
    assert model.state == ModelState.FAILED and model.last_error == "not a GGUF file"
    assert model.spawn_count == 0
    await model.start()  # an explicit restart (the supervisor's) may still try
    assert model.state == ModelState.READY and model.spawn_count == 1
    await model.close()


async def test_a_sigkill_lalo_did_not_send_is_named_a_kill_for_memory(tmp_path: Path) -> None:
    import os
    import signal

    heard = Heard()
    model = make(tmp_path, events=heard)
    try:
        endpoint = await model.start()
        gone = model.gone
        await wait_for(lambda: model.run_peak is not None)
        os.kill(endpoint.pid, signal.SIGKILL)  # as the kernel's OOM killer does
        await wait_for(lambda: model.pid is None)
        reached = heard.out_of_memory_at[0]
        assert reached == model.run_peak and reached in heard.peaks
        from launcher.units import format_size

        assert model.last_exit == ("killed, most likely for memory: it had reached "
                                   + format_size(reached) + " (SIGKILL)")
        assert (model.last_error or "").startswith(model.last_exit)
        assert gone.is_set() and gone.reason == model.last_exit  # what its leases tell clients
        assert model.snapshot()["last_exit"] == model.last_exit
        assert model.state == ModelState.FAILED
    finally:
        await model.close()


async def test_a_kill_counted_by_the_cgroup_names_the_container_limit(tmp_path: Path) -> None:
    import os
    import signal

    counts = iter([OomKills(2, 400 * 1024**2), OomKills(3, 400 * 1024**2)])
    model = make(tmp_path, oom_kills=lambda: next(counts))
    try:
        endpoint = await model.start()
        await wait_for(lambda: model.run_peak is not None)
        os.kill(endpoint.pid, signal.SIGKILL)
        await wait_for(lambda: model.pid is None)
        assert (model.last_exit or "").startswith(
            "killed by the memory limit of this container (400 MiB): it had reached ")
    finally:
        await model.close()


async def test_a_hung_server_lalo_killed_is_not_called_a_kill_for_memory(tmp_path: Path) -> None:
    import os
    import signal

    heard = Heard()
    model = make(tmp_path, events=heard, liveness_timeout=0.3)
    try:
        endpoint = await model.start()
        os.kill(endpoint.pid, signal.SIGSTOP)  # hangs: lalo kills it with SIGKILL itself
        await wait_for(lambda: model.pid is None)
        assert "(hung); killed" in (model.last_exit or "") and not heard.out_of_memory_at
    finally:
        await model.close()
