"""An engine wheel as an organisation publishes it: `lalo engine build --wheel` from the engine
already built (no compile), then a fresh venv with its stock pip, lalo and that wheel installed
from a local folder, an empty lalo cache, and `lalo up --demo` starts without compiling and
answers "Paris". The time from `lalo up --demo` to the first answer is printed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.engine import test_engine_variant
from tests.support.lalo import demo_served, lalo_env
from tests.support.venvs import make_venv

pytestmark = pytest.mark.integration
# the engine the tests run (native on a fresh CI machine; portable where it is built in the
# Debian 11 root): it is in the cache, so the wheel is made without compiling
VARIANT = test_engine_variant()
REPO = Path(__file__).resolve().parents[2]
QUESTION = {
    "model": "demo", "temperature": 0, "max_tokens": 32,
    "messages": [{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "What is the capital of France?"}],
}


def run(label: str, argv: list[str], env: dict[str, str], timeout: float = 600) -> str:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{label} failed:\n{done.stdout}\n{done.stderr}"
    print(f"engine wheel: {label}: {time.monotonic() - started:.1f} s")
    return done.stdout


def clean_env(tmp_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = lalo_env(tmp_path / "state", tmp_path / "config", extra)
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "LALO_PIP"):  # nothing of the test's own Python
        env.pop(name, None)
    return env


@pytest.mark.timeout(1800)  # a cold pip cache downloads lalo's dependencies and the model
def test_lalo_up_demo_starts_from_an_installed_engine_wheel(
    llama_server_bin: Path, tmp_path: Path,
) -> None:
    dist = tmp_path / "dist"
    out = run(f"lalo engine build --wheel --variant {VARIANT}",
              [sys.executable, "-m", "launcher", "engine", "build", "--wheel", "--variant",
               VARIANT, "--out", str(dist)], clean_env(tmp_path))
    assert out.startswith("already built: "), out  # the cached engine, not a second compile
    (wheel,) = dist.glob(f"lalo_engine_{VARIANT}-*-py3-none-manylinux_2_*_x86_64.whl")
    assert f"wheel {wheel}" in out, out
    print(f"engine wheel: {wheel.name}, {wheel.stat().st_size / 1024**2:.1f} MiB")

    venv = tmp_path / "venv"
    make_venv(venv)  # python3 -m venv, its stock pip
    pip = str(venv / "bin" / "pip")
    env = clean_env(tmp_path, {"LALO_CACHE_DIR": str(tmp_path / "empty-cache")})
    run("pip install -e .", [pip, "install", "-q", "-e", str(REPO)], env)
    run(f"pip install lalo-engine-{VARIANT}", [pip, "install", "-q", "--no-index", "--find-links",
                                               str(dist), f"lalo-engine-{VARIANT}"], env)
    site = next((venv / "lib").glob("python3*/site-packages"))
    server = site / f"lalo_engine_{VARIANT}" / "engine" / "bin" / "llama-server"
    assert os.access(server, os.X_OK), "pip did not keep the executable bit"

    listing = run("lalo engine list", [str(venv / "bin" / "lalo"), "engine", "list"], env)
    chosen = [line for line in listing.splitlines() if line.startswith("*")]
    assert chosen and f"installed from wheel lalo-engine-{VARIANT} 0.3.36" in chosen[0], listing
    assert chosen[0].endswith(str(server)), listing

    log = tmp_path / "lalo-up.log"
    answer, seconds = first_answer(venv, env, log)
    output = log.read_text()
    assert "Paris" in answer, f"{answer!r}\n{output}"
    # no build announced, no compile progress
    assert "no llama-server found" not in output and "engine: [" not in output, output
    assert "demo: fetching SmolLM2-135M-Instruct" in output, output  # the cache was empty
    assert not (tmp_path / "empty-cache" / "engines").exists()  # nothing was compiled
    print(f"engine wheel: lalo up --demo to the first answer: {seconds:.1f} s")


def first_answer(venv: Path, env: dict[str, str], log: Path) -> tuple[str, float]:
    """(the demo's answer, seconds from starting `lalo up --demo` to that answer)."""
    started = time.monotonic()
    with demo_served([str(venv / "bin" / "lalo")], env, log, timeout=600) as url:
        reply = httpx.post(url + "/v1/chat/completions", json=QUESTION, timeout=120)
        reply.raise_for_status()
        seconds = time.monotonic() - started
        return str(reply.json()["choices"][0]["message"]["content"]), seconds
