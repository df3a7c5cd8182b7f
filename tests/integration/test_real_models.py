"""The two real catalog models behind one lalo: SmolLM2 preloaded (by catalog id), Gemma 3 started
on demand while SmolLM2 stays loaded; both answer, each near its estimate."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.support.lalo import LaloUp, lalo_env, write_config

pytestmark = pytest.mark.integration


def test_gemma_on_demand_while_smollm2_is_loaded(llama_server_bin: Path, smollm2: Path, gemma3: Path,
                                                  tmp_path: Path) -> None:
    # `catalog:` ids resolve to the files the fixtures pulled into lalo's model cache
    config = write_config(
        tmp_path / "lalo.yaml",
        {
            "smol": {"catalog": "smollm2-135m-instruct", "ctx_size": 2048, "parallel": 1},
            "gemma": {"catalog": "gemma-3-270m", "ctx_size": 4096, "parallel": 1, "preload": False},
        },
        engines={"llama_server": {"path": str(llama_server_bin)}},
    )
    with LaloUp(config, lalo_env(tmp_path / "state", tmp_path / "config")) as up:
        up.wait_state("smol", "ready")
        assert up.model("gemma")["state"] == "stopped"
        with httpx.Client(base_url=up.url, timeout=300) as client:
            chat = client.post("/v1/chat/completions", json={
                "model": "smol", "temperature": 0, "max_tokens": 24,
                "messages": [{"role": "system", "content": "You are a helpful assistant."},
                             {"role": "user", "content": "What is the capital of France?"}]})
            assert chat.status_code == 200, chat.text
            assert "Paris" in chat.json()["choices"][0]["message"]["content"]
            # Gemma 3 has no chat template in its file: plain completion
            completion = client.post("/v1/completions", json={
                "model": "gemma", "temperature": 0, "max_tokens": 8,
                "prompt": "Paris is the capital of"})
            assert completion.status_code == 200, completion.text
            assert "France" in completion.json()["choices"][0]["text"]
        models = {m["name"]: m for m in up.status()["models"]}
        assert models["smol"]["state"] == models["gemma"]["state"] == "ready"
        for name in ("smol", "gemma"):
            estimate, rss = models[name]["ram_estimate"], models[name]["rss"]
            assert rss and abs(estimate - rss) / rss < 0.25, (name, estimate, rss)
        assert models["smol"]["pid"] != models["gemma"]["pid"]
    assert smollm2.is_file() and gemma3.is_file()
