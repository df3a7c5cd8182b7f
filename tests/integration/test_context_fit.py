"""`ctx_size: auto` on the real models: `lalo plan` says what it chose and why, `lalo up` starts
the server with it, and a prompt longer than the context gets a 400 naming both counts on every
API lalo serves (never a silent cut)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from launcher.models.gguf_file import read_gguf
from launcher.models.shape import ModelFacts
from launcher.placement.estimate import MemorySettings, estimate_for
from tests.support.lalo import LaloUp, lalo_env, write_config

pytestmark = pytest.mark.integration
MIB = 1024**2
LONG = "Tell me about the long history of the city of Paris and its rivers. " * 40


def plan_json(config: Path, env: dict[str, str]) -> dict[str, dict[str, object]]:
    done = subprocess.run([sys.executable, "-m", "launcher", "plan", "--config", str(config), "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return {m["name"]: m for m in json.loads(done.stdout)["models"]}


def test_plan_fits_the_contexts_in_the_budget(smollm2: Path, gemma3: Path, tmp_path: Path) -> None:
    facts = {"smol": ModelFacts.from_gguf(read_gguf(smollm2)),
             "gemma": ModelFacts.from_gguf(read_gguf(gemma3))}
    budget = 600 * MIB  # both fit at 2048 tokens, neither at its trained length beside the other
    config = write_config(tmp_path / "lalo.yaml", {
        "smol": {"file": str(smollm2), "ctx_size": "auto"},
        "gemma": {"file": str(gemma3), "ctx_size": "auto"},
    }, resources={"ram_budget": budget})
    models = plan_json(config, lalo_env(tmp_path / "state", tmp_path / "config"))

    def need(name: str, ctx: int) -> int:
        return estimate_for(facts[name], MemorySettings(ctx)).total

    ctx = {name: int(str(models[name]["ctx_size"])) for name in facts}
    assert all(models[name]["action"] == "start" for name in facts)
    assert 2048 < ctx["smol"] < 8192 and 2048 < ctx["gemma"] < 32768
    assert all(value % 256 == 0 for value in ctx.values())
    assert {name: int(str(models[name]["required"])) for name in facts} == {
        name: need(name, ctx[name]) for name in facts}
    assert need("smol", ctx["smol"]) + need("gemma", ctx["gemma"]) <= budget
    # the last one takes what is left: one step more would not fit
    assert need("smol", ctx["smol"]) + need("gemma", ctx["gemma"] + 256) > budget
    assert "the most that fits" in str(models["gemma"]["ctx_note"])
    assert "can use 32768: the trained length 32768" in str(models["gemma"]["ctx_note"])


def test_a_prompt_longer_than_the_context_is_refused_on_every_api(
        llama_server_bin: Path, smollm2: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "lalo.yaml", {"smol": {"file": str(smollm2), "ctx_size": "auto", "ctx_max": 512}},
        engines={"llama_server": {"path": str(llama_server_bin)}})
    with LaloUp(config, lalo_env(tmp_path / "state", tmp_path / "config")) as up:
        assert up.wait_state("smol", "ready")["ctx_size"] == 512
        assert "smol: ctx_size auto: 512, ctx_max 512" in up.output()
        messages = [{"role": "user", "content": LONG}]
        asks = {
            "openai": ("/v1/chat/completions", {"messages": messages, "max_tokens": 4}),
            "openai stream": ("/v1/chat/completions", {"messages": messages, "max_tokens": 4,
                                                       "stream": True}),
            "completions": ("/v1/completions", {"prompt": LONG, "max_tokens": 4}),
            "anthropic": ("/v1/messages", {"messages": messages, "max_tokens": 4}),
            "anthropic stream": ("/v1/messages", {"messages": messages, "max_tokens": 4, "stream": True}),
            "ollama chat": ("/api/chat", {"messages": messages, "stream": False}),
            "ollama chat stream": ("/api/chat", {"messages": messages}),
            "ollama generate": ("/api/generate", {"prompt": LONG, "stream": False}),
        }
        with httpx.Client(base_url=up.url, timeout=120) as client:
            for api, (path, body) in asks.items():
                answer = client.post(path, json={"model": "smol", **body})
                assert answer.status_code == 400, (api, answer.text)
                text = answer.text
                assert "tokens) exceeds" in text and "(512 tokens)" in text, (api, text)
                assert "ctx_size" in text, (api, text)  # the lalo setting that changes it
            fits = client.post("/v1/chat/completions", json={
                "model": "smol", "max_tokens": 8, "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "What is the capital of France?"}]})
            assert fits.status_code == 200, fits.text
