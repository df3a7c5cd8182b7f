"""lalo's llama.cpp patch 0003 (`--sleep-save-slots`) on a real llama-server with SmolLM2,
started by lalo's launch spec: a sleep keeps the slot's prompt (saved as the server falls asleep,
restored as it wakes, before the request that woke it runs); without the flag the woken server
computes the prompt again; a save that finds the disk full leaves no file and costs only the
recompute; the flag without a slot directory stops the server at start with one line."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from launcher.engines.base import ServerSettings
from launcher.engines.llama_server import LlamaServerEngine
from launcher.engines.patch_series import SLEEP_SAVE_SLOTS as PATCH
from tests.support.lalo import free_port, wait_until
from tests.support.llama_server import KEY, Server, running, skip_unless_patched
from tests.support.small_disk import MountRefused, small_disk

pytestmark = pytest.mark.integration

# ~450 SmolLM2 tokens of instructions, then a completion the model knows
PROMPT = "You are a careful assistant. " + " ".join(
    f"Rule {i}: answer in plain words, keep it short, and never invent facts about item {i}."
    for i in range(18)) + "\nThe capital of France is"


@contextmanager
def sleepy(binary: Path, model: Path, slots: Path, log: Path, *, patched: bool) -> Iterator[Server]:
    """SmolLM2 with `--sleep-idle-seconds 1` and `--slot-save-path`, and `--sleep-save-slots`
    when `patched` (lalo passes it only to an engine that carries the patch)."""
    engine = LlamaServerEngine.with_patches(binary, [PATCH] if patched else [])
    spec = engine.launch_spec(ServerSettings(
        model_path=model, host="127.0.0.1", port=free_port(), api_key=KEY, ctx_size=2048,
        parallel=1, threads=2, sleep_after=1, slot_save_path=slots))
    assert ("--sleep-save-slots" in spec.argv) == patched
    with running(list(spec.argv), dict(spec.env), spec.base_url, log) as started:
        yield started


def complete(client: httpx.Client) -> dict[str, Any]:
    answer = client.post("/completion", json={"prompt": PROMPT, "n_predict": 6, "temperature": 0})
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def fall_asleep(client: httpx.Client) -> None:
    """Until /props (which never wakes the server) says it sleeps."""
    wait_until(lambda: client.get("/props").json().get("is_sleeping") is True, timeout=30,
               message="the server to sleep")


@pytest.fixture
def patched_bin(llama_server_bin: Path) -> Path:
    skip_unless_patched(llama_server_bin, PATCH)
    return llama_server_bin


def test_a_sleep_keeps_the_prompt(patched_bin: Path, smollm2: Path, tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    slots.mkdir()
    log = tmp_path / "llama-server.log"
    with sleepy(patched_bin, smollm2, slots, log, patched=True) as server, server.client() as client:
        first = complete(client)
        assert first["timings"]["prompt_n"] > 300, first["timings"]  # computed in full
        assert "Paris" in first["content"]
        fall_asleep(client)
        saved = slots / "slot-0.slot"
        assert saved.is_file() and saved.stat().st_size > 0
        assert not list(slots.glob("*.part"))
        again = complete(client)  # wakes it
        # restored before this request ran: only the prompt's last token is computed
        assert again["timings"]["prompt_n"] < 16, again["timings"]
        assert again["timings"]["cache_n"] >= first["timings"]["prompt_n"] - 16, again["timings"]
        assert again["content"] == first["content"]
        assert server.proc.poll() is None  # the same process: woken, not restarted
    text = log.read_text(errors="replace")
    assert "slot 0: saved" in text and "before sleeping" in text, text[-3000:]
    assert "slot 0: restored" in text and "after sleeping" in text, text[-3000:]


def test_without_the_flag_a_woken_server_computes_the_prompt_again(
    llama_server_bin: Path, smollm2: Path, tmp_path: Path,
) -> None:
    """What llama.cpp does without the patch's flag: the reason for the patch."""
    slots = tmp_path / "slots"
    slots.mkdir()
    with sleepy(llama_server_bin, smollm2, slots, tmp_path / "log", patched=False) as server, \
            server.client() as client:
        first = complete(client)
        fall_asleep(client)
        assert not list(slots.iterdir())  # nothing saved
        again = complete(client)
        assert again["timings"]["prompt_n"] >= first["timings"]["prompt_n"] - 1, again["timings"]
        assert "Paris" in again["content"]


def test_a_full_disk_costs_the_recompute_only(patched_bin: Path, smollm2: Path,
                                              tmp_path: Path) -> None:
    """The slot file (~10 MiB here) does not fit in 1 MiB: the server logs it, leaves no part
    file, still sleeps and frees its memory, and wakes to answer."""
    log = tmp_path / "llama-server.log"
    try:
        with small_disk(tmp_path / "slots", 1024 * 1024) as slots, \
                sleepy(patched_bin, smollm2, slots, log, patched=True) as server, \
                server.client() as client:
            first = complete(client)
            fall_asleep(client)
            assert not list(slots.iterdir())
            again = complete(client)
            assert again["timings"]["prompt_n"] >= first["timings"]["prompt_n"] - 1
            assert again["content"] == first["content"]
            assert server.proc.poll() is None
    except MountRefused as exc:
        pytest.skip(str(exc))
    text = log.read_text(errors="replace")
    assert "slot 0: not saved before sleeping, its prompt will be computed again" in text, \
        text[-3000:]


def test_the_flag_needs_a_slot_directory(patched_bin: Path, smollm2: Path) -> None:
    done = subprocess.run([str(patched_bin), "--model", str(smollm2), "--port", str(free_port()),
                           "--sleep-idle-seconds", "1", "--sleep-save-slots"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "--sleep-save-slots needs --slot-save-path" in done.stdout + done.stderr
