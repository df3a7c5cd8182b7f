"""The Windows engine under wine: llama-server.exe cross-compiled with mingw-w64 (`lalo engine
build --platform windows`) is static and serves the real SmolLM2 model, answering "Paris", also
after its thread counts are changed (patch 0002's POST /threads, on ggml's own thread pools).
The package built on it (NAME.exe, the installer): tests/integration/test_windows_package.py.

The Windows build takes about 10 minutes on 2 cores (20 on a busy machine), once: lalo caches it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from launcher.engines.builder import build_engine
from launcher.engines.cmake import WINDOWS
from launcher.engines.install import BuiltEngine
from tests.support.lalo import free_port, wait_until

QUESTION = "What is the capital of France? Answer with one word."
START_TIMEOUT = 180.0  # a first wine prefix takes seconds; a busy machine many more


def _why_not() -> str | None:
    for tool, package in (("wine", "wine wine64"),
                          ("x86_64-w64-mingw32-gcc-posix", "g++-mingw-w64-x86-64-posix")):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install {package}; scripts/test.sh installs it)"
    return None


pytestmark = [
    pytest.mark.integration,
    pytest.mark.build,
    pytest.mark.skipif(_why_not() is not None, reason=_why_not() or ""),
    pytest.mark.timeout(3600),
]


@pytest.fixture(scope="module")
def windows_engine() -> BuiltEngine:
    return build_engine("portable", platform_name="windows")


@pytest.fixture
def wine_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A wine prefix of its own; its wineserver (and every exe in it) killed afterwards."""
    env = {**os.environ, "WINEPREFIX": str(tmp_path / "wineprefix"), "WINEDEBUG": "-all",
           "WINEDLLOVERRIDES": "mscoree,mshtml="}  # no Mono/Gecko installer prompts
    yield env
    subprocess.run(["wineserver", "-k"], env=env, check=False, timeout=60,
                   capture_output=True)


def _ask(port: int, proc: subprocess.Popen[bytes], log: Path, model: str,
         launcher_only: bool = False) -> str:
    """The answer to QUESTION once /health is 200; `launcher_only`: `proc` only starts the
    server (`wine cmd`), so its exit is no failure."""
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None and not launcher_only:
            raise AssertionError(f"exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            return httpx.get(f"{url}/health", timeout=2.0, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, START_TIMEOUT, message=f"llama-server.exe healthy at {url}")
    response = httpx.post(f"{url}/v1/chat/completions", timeout=120.0, trust_env=False, json={
        "model": model, "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": QUESTION}],
    })
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_exe_is_static_and_windows_only(windows_engine: BuiltEngine) -> None:
    assert windows_engine.server.name == "llama-server.exe"
    assert windows_engine.manifest.platform == WINDOWS
    head = windows_engine.server.read_bytes()[:2]
    assert head == b"MZ"
    done = subprocess.run(["objdump", "-p", str(windows_engine.server)], capture_output=True,
                          text=True, check=False)
    if done.returncode == 0:  # only Windows' own DLLs: nothing from MinGW travels with it
        dlls = {line.split()[-1].lower() for line in done.stdout.splitlines()
                if "DLL Name:" in line}
        assert dlls and not any(d.startswith(("libstdc++", "libgcc", "libwinpthread", "libgomp"))
                                for d in dlls), dlls


def test_exe_serves_smollm2_under_wine(windows_engine: BuiltEngine, smollm2: Path,
                                       wine_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            ["wine", str(windows_engine.server), "-m", str(smollm2), "--host", "127.0.0.1",
             "--port", str(port), "-c", "1024", "--alias", "smol", "-t", "1"],
            env=wine_env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        assert "Paris" in _ask(port, proc, log, "smol")
        # lalo's patch 0002 on ggml's own thread pools (this build has no OpenMP): POST /threads
        # makes new pools (more threads than at start, a batch pool apart, then one pool again)
        # between decodes; more threads than CPUs would be slow here (its barrier only spins)
        for counts in ({"n_threads": 2, "n_threads_batch": 1}, {"n_threads": 1}):
            changed = httpx.post(f"http://127.0.0.1:{port}/threads", json=counts, timeout=60,
                                 trust_env=False)
            assert changed.status_code == 200, changed.text
            assert changed.json().items() >= counts.items(), changed.json()
            assert "Paris" in _ask(port, proc, log, "smol")
    finally:
        proc.kill()
        proc.wait()


def test_exe_keeps_its_slot_across_sleeps_under_wine(windows_engine: BuiltEngine, smollm2: Path,
                                                     wine_env: dict[str, str],
                                                     tmp_path: Path) -> None:
    """lalo's patch 0003 on Windows: the slot file is flushed (FlushFileBuffers) and renamed
    over the one the previous sleep left, and each wake restores it."""
    port = free_port()
    log = tmp_path / "server.log"
    slots = tmp_path / "slots"
    slots.mkdir()
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            ["wine", str(windows_engine.server), "-m", str(smollm2), "--host", "127.0.0.1",
             "--port", str(port), "-c", "1024", "--alias", "smol", "-t", "1", "-np", "1",
             "--sleep-idle-seconds", "1", "--slot-save-path", str(slots), "--sleep-save-slots"],
            env=wine_env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def asleep() -> bool:
        props = httpx.get(f"{url}/props", timeout=10, trust_env=False).json()
        return props.get("is_sleeping") is True

    try:
        saved: list[int] = []
        for _ in range(2):  # the second sleep replaces the first one's file
            assert "Paris" in _ask(port, proc, log, "smol")
            wait_until(asleep, 60, message="llama-server.exe to sleep")
            wait_until(lambda: (slots / "slot-0.slot").is_file(), 10, message="the slot file")
            saved.append((slots / "slot-0.slot").stat().st_mtime_ns)
        assert saved[1] > saved[0] and not list(slots.glob("*.part"))
        assert "Paris" in _ask(port, proc, log, "smol")
    finally:
        proc.kill()
        proc.wait()
    text = log.read_text(errors="replace")
    assert text.count("before sleeping") >= 2 and text.count("after sleeping") >= 2, text[-3000:]
    assert "not saved" not in text and "not restored" not in text, text[-3000:]
