"""Sleep and wake of a real llama-server behind lalo, and a prompt cache kept across an unload
and (lalo's engine) across a sleep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from launcher.engines.patch_series import SLEEP_SAVE_SLOTS
from launcher.models.gguf_file import read_gguf
from launcher.supervisor.server_options import uses_sliding_window
from tests.support.lalo import FAST_SUPERVISOR, LaloUp, wait_until, write_config
from tests.support.llama_server import skip_unless_patched

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France? Answer with one word."


def long_system_prompt(rules: int) -> str:
    """Instructions as the LALO backend sends them: about 25 SmolLM2 tokens per rule."""
    return "You are a careful assistant. " + " ".join(
        f"Rule {i}: answer in plain words, keep it short, and never invent facts about item {i}."
        for i in range(rules))


def chat(up: LaloUp, model: str, system: str | None = None) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": QUESTION}]
    response = httpx.post(up.url + "/v1/chat/completions", timeout=600.0, json={
        "model": model, "messages": messages, "temperature": 0, "max_tokens": 12})
    assert response.status_code == 200, response.text
    return dict(response.json())


def log_lines(up: LaloUp, name: str = "smol") -> list[str]:
    response = httpx.get(f"{up.url}/api/models/{name}/logs?n=1000", timeout=5)
    response.raise_for_status()
    return [str(line) for line in response.json()["lines"]]


def test_sliding_window_is_read_from_the_real_files(smollm2: Path, gemma3: Path) -> None:
    assert uses_sliding_window(read_gguf(gemma3))
    assert not uses_sliding_window(read_gguf(smollm2))


def test_sleep_frees_memory_and_the_next_request_wakes_it(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, smollm2: Path,
) -> None:
    config = write_config(
        tmp_path / "lalo.yaml", {"smol": {"file": str(smollm2), "sleep_after": 1}},
        engines={"llama_server": {"path": str(llama_server_bin)}}, supervisor=FAST_SUPERVISOR)
    env = {**isolated, "LALO_CACHE_DIR": str(tmp_path / "cache")}
    with LaloUp(config, env) as up:
        up.wait_state("smol", "ready")
        assert "Paris" in chat(up, "smol")["choices"][0]["message"]["content"]
        awake = wait_until(lambda: up.model("smol")["rss"], message="an RSS sample")
        pid = up.model("smol")["pid"]
        asleep = up.wait_state("smol", "sleeping", timeout=30)
        # weights and KV cache freed: the RSS the budget counts falls to the bare process
        wait_until(lambda: (r := up.model("smol")["rss"]) and r < awake * 0.6,
                   message=f"RSS below 60 % of {awake} while asleep")
        assert asleep["pid"] == pid
        answer = chat(up, "smol")
        assert "Paris" in answer["choices"][0]["message"]["content"]
        woke = up.model("smol")
        assert woke["pid"] == pid and woke["restarts"] == 0
        notes = [line for line in log_lines(up)
                 if line.endswith(("sleeping: weights freed, process kept", "lalo: awake"))]
        assert notes[:2] == ["--- lalo: sleeping: weights freed, process kept", "--- lalo: awake"]
        # ready now, unless this slow machine took over sleep_after since the answer and it
        # has gone back to sleep (then the log says so after the wake)
        assert woke["state"] == "ready" or (woke["state"] == "sleeping" and len(notes) >= 3)


def test_prompt_cache_survives_an_unload(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, smollm2: Path,
) -> None:
    cache = tmp_path / "cache"
    config = write_config(
        tmp_path / "lalo.yaml", {"smol": {"file": str(smollm2), "ctx_size": 4096}},
        engines={"llama_server": {"path": str(llama_server_bin)}}, supervisor=FAST_SUPERVISOR)
    system = long_system_prompt(16)  # ~400 tokens: enough to tell reuse from recompute
    with LaloUp(config, {**isolated, "LALO_CACHE_DIR": str(cache)}) as up:
        up.wait_state("smol", "ready")
        first = chat(up, "smol", system)["timings"]
        assert first["prompt_n"] > 300, first  # the whole prompt was computed
        unloaded = httpx.post(up.url + "/api/models/smol/unload", timeout=60)
        assert unloaded.status_code == 200, unloaded.text
        up.wait_state("smol", "stopped")
        files = list((cache / "prompt-cache" / "smol").glob("*/slot-0.slot"))
        assert len(files) == 1 and files[0].stat().st_size > 0
        loaded = httpx.post(up.url + "/api/models/smol/load", timeout=120)
        assert loaded.status_code == 200, loaded.text
        again = chat(up, "smol", system)["timings"]
        # restored before the model was ready: only the end of the prompt is computed
        assert again["prompt_n"] < 64, again
        assert again["cache_n"] >= first["prompt_n"] - 64, again
        log = log_lines(up)
        assert any(line.startswith("--- lalo: prompt cache: saved") for line in log)
        assert any(line.startswith("--- lalo: prompt cache: restored") for line in log)


def test_a_sleep_keeps_the_prompt_cache(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, smollm2: Path,
) -> None:
    """lalo's engine (patch 0003) saves the slot as it falls asleep and restores it on waking."""
    skip_unless_patched(llama_server_bin, SLEEP_SAVE_SLOTS)
    cache = tmp_path / "cache"
    config = write_config(
        tmp_path / "lalo.yaml", {"smol": {"file": str(smollm2), "ctx_size": 4096, "sleep_after": 1}},
        engines={"llama_server": {"path": str(llama_server_bin)}}, supervisor=FAST_SUPERVISOR)
    system = long_system_prompt(16)
    with LaloUp(config, {**isolated, "LALO_CACHE_DIR": str(cache)}) as up:
        up.wait_state("smol", "ready")
        first = chat(up, "smol", system)
        assert first["timings"]["prompt_n"] > 300, first["timings"]
        pid = up.model("smol")["pid"]
        up.wait_state("smol", "sleeping", timeout=30)
        assert list((cache / "prompt-cache" / "smol").glob("*/slot-0.slot"))
        wait_until(lambda: any("as it went to sleep" in line for line in log_lines(up)),
                   message="the model's log to say the server saved its slot")
        again = chat(up, "smol", system)
        assert again["timings"]["prompt_n"] < 64, again["timings"]  # not computed again
        assert "Paris" in again["choices"][0]["message"]["content"]
        assert up.model("smol")["pid"] == pid  # woken, not restarted
