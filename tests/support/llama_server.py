"""A real llama-server run by a test: started in its own session, stopped with TERM then KILL,
and the check that it carries one of lalo's llama.cpp patches."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from launcher.engines.registry import read_manifest
from launcher.errors import EngineError
from tests.support.lalo import wait_until

KEY = "lalo-test-server-key"
STOP_TIMEOUT = 10.0


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self, key: str | None = KEY, keepalive: bool = True) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_keepalive_connections=None if keepalive else 0)
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, trust_env=False,
                            limits=limits)


def skip_unless_patched(binary: Path, patch: str) -> None:
    """Skip unless `binary` is an engine lalo built with its patch `patch` (a configured or
    PATH llama-server, or one built before the patch, lacks what it adds)."""
    try:
        patches = read_manifest(binary.parent.parent).extra.get("patches") or []
    except EngineError as exc:  # no manifest: not an engine lalo built
        pytest.skip(f"{binary} is not an engine lalo built ({exc}), so it lacks {patch}")
    if patch not in patches:
        pytest.skip(f"{binary} was built without lalo's {patch}")


@contextmanager
def running(argv: list[str], env: dict[str, str], url: str, log: Path) -> Iterator[Server]:
    """A llama-server in its own session, once /health answers; stopped with TERM, then KILL."""
    with log.open("wb") as handle:
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> bool:
            if proc.poll() is not None:  # a server that died while loading fails at once
                raise AssertionError(f"llama-server exited with {proc.returncode}:\n"
                                     f"{log.read_text(errors='replace')[-3000:]}")
            return httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200

        wait_until(ready, timeout=60, message="llama-server to load")
        yield Server(url, proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
