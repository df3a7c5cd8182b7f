"""ManagedModel lifecycle against a small real fake-server process (slow start, exit, hang)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from launcher.engines.base import LaunchSpec, ServerSettings, base_url
from launcher.errors import ModelFailedError, ModelStartError, ModelStoppedError
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


def make(tmp_path: Path, *flags: str, **timeouts: float) -> ManagedModel:
    settings = ServerSettings(model_path=tmp_path / "m.gguf", host="127.0.0.1", port=0,
                              api_key="", ctx_size=512, parallel=1, threads=None)
    return ManagedModel(
        "m", FakeEngine(flags), settings, ModelLog(tmp_path / "m.log"),
        timeouts=Timeouts(**{"load_timeout": 10.0, "health_interval": 0.1,
                             "liveness_timeout": 1.0, "stop_timeout": 2.0, **timeouts}),
        policy=RestartPolicy(initial_delay=0.2, max_delay=0.4, max_failures=3),
    )


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
        endpoints = await asyncio.gather(*(model.ensure_ready() for _ in range(5)))
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
            await model.ensure_ready()
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
            await model.ensure_ready()
        assert model.pid is None
    finally:
        await model.close()


async def test_crash_loop_backs_off_then_fails_for_good(
    tmp_path: Path
) -> None:
    model = make(tmp_path, "--exit-after", "0.1", "--exit-code", "1", "--ready-after", "5")
    try:
        with pytest.raises(ModelStartError):
            await model.ensure_ready()
        await wait_for(lambda: model.failed_for_good)
        assert model.spawn_count == 3 and model.policy.failures == 3
        with pytest.raises(ModelFailedError, match="failed: m: server exited while starting"):
            await model.ensure_ready()
        assert model.spawn_count == 3  # refusing does not start anything
    finally:
        await model.close()


async def test_crash_after_ready_is_restarted_and_waiters_get_the_new_server(
    tmp_path: Path
) -> None:
    model = make(tmp_path, "--exit-after", "0.6")
    try:
        first = await model.ensure_ready()
        await wait_for(lambda: model.state == ModelState.FAILED)
        assert model.restart_at is not None
        second = await model.ensure_ready()  # waits for the scheduled restart
        assert second.pid != first.pid and model.restarts >= 1
    finally:
        await model.close()


async def test_a_server_that_ignores_sigterm_is_killed(
    tmp_path: Path
) -> None:
    model = make(tmp_path, "--ignore-term", stop_timeout=0.5)
    endpoint = await model.ensure_ready()
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
    waiter = asyncio.ensure_future(model.ensure_ready())
    await wait_for(lambda: model.pid is not None)
    pid = model.pid
    await asyncio.gather(model.stop("test"), model.stop("twice is fine"))
    with pytest.raises(ModelStoppedError):
        await waiter
    import psutil

    assert pid is not None and not psutil.pid_exists(pid)
    await model.close()


async def test_explicit_restart_clears_failed(tmp_path: Path) -> None:
    model = make(tmp_path)
    model.mark_invalid("not a GGUF file")
    assert model.failed_for_good
    with pytest.raises(ModelFailedError, match="not a GGUF file"):
        await model.ensure_ready()
    await model.restart()
    assert model.state == ModelState.READY and model.policy.failures == 0
    await model.close()
