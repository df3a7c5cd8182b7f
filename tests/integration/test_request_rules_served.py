"""lalo.yaml's per-model request rules against `lalo up` with the real SmolLM2-135M-Instruct,
through the official OpenAI, Anthropic and Ollama clients: `set` makes answers repeatable
whatever the caller sends, `limits` caps the answer's length on every API, and the activity
entry says what was changed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from tests.support.lalo import FAST_SUPERVISOR, LaloUp, lalo_env, write_config

pytestmark = pytest.mark.integration

SYSTEM = "You are a helpful assistant."
STORY = "Write a long story about a dragon who learns to bake bread."
CAP = 5


@pytest.fixture(scope="module")
def lalo(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path,
         smollm2: Path) -> Iterator[LaloUp]:
    tmp = tmp_path_factory.mktemp("request-rules")
    model = {"file": str(smollm2), "ctx_size": 1024}
    config = write_config(
        tmp / "lalo.yaml",
        {
            "greedy": {**model, "set": {"temperature": 0}},
            "short": {**model, "limits": {"max_tokens": CAP}, "strip": ["seed"]},
            "plain": {**model, "preload": False},  # no rules: the control
        },
        engines={"llama_server": {"path": str(llama_server_bin)}},
        supervisor=FAST_SUPERVISOR,
    )
    with LaloUp(config, lalo_env(tmp / "state", tmp / "config")) as up:
        up.wait_state("greedy", "ready")
        up.wait_state("short", "ready")
        yield up


def activity(lalo: LaloUp, model: str, n: int) -> list[dict[str, Any]]:
    """The newest `n` entries of `model`, oldest first."""
    answer = httpx.get(f"{lalo.url}/api/activity", params={"model": model, "n": n}, timeout=10)
    answer.raise_for_status()
    return list(reversed(answer.json()["requests"]))


def openai_client(lalo: LaloUp) -> openai.OpenAI:
    return openai.OpenAI(base_url=lalo.url + "/v1", api_key="unused", timeout=120)


def chat(client: openai.OpenAI, model: str, content: str, **params: Any) -> tuple[str, Any]:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": SYSTEM},
                               {"role": "user", "content": content}], **params)
    return reply.choices[0].message.content or "", reply


def test_set_temperature_makes_answers_repeatable(lalo: LaloUp) -> None:
    client = openai_client(lalo)
    question = "Invent a name for a new kind of fruit and describe its taste."
    hot = {"temperature": 1.5, "max_tokens": 32}
    first, _ = chat(client, "greedy", question, seed=1, **hot)
    second, _ = chat(client, "greedy", question, seed=2, **hot)
    greedy, _ = chat(client, "greedy", question, temperature=0, max_tokens=32)
    assert first == second == greedy and first
    # the same calls to the model without rules: the seeds make two different answers
    control = {chat(client, "plain", question, seed=seed, **hot)[0] for seed in (1, 2)}
    assert len(control) == 2, control
    # Ollama's options.temperature reaches the same rule: the same answer
    reply = ollama.Client(host=lalo.url, timeout=120).chat(
        model="greedy", messages=[{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": question}],
        options={"temperature": 1.5, "seed": 3, "num_predict": 32})
    assert reply.message.content == first
    # and Anthropic's temperature (at most 1 there; this SDK takes it only as an extra field)
    message = anthropic.Anthropic(base_url=lalo.url, api_key="unused", timeout=120).messages.create(
        model="greedy", max_tokens=32, system=SYSTEM, extra_body={"temperature": 1.0},
        messages=[{"role": "user", "content": question}])
    assert message.content[0].type == "text" and message.content[0].text == first
    entries = activity(lalo, "greedy", 5)
    assert [entry.get("params_changed") for entry in entries] == [
        {"temperature": [1.5, 0.0]}, {"temperature": [1.5, 0.0]}, None,
        {"temperature": [1.5, 0.0]}, {"temperature": [1.0, 0.0]}]
    assert [entry["route"] for entry in entries[-2:]] == ["ollama_chat", "messages"]


def test_limit_caps_the_answer_on_every_api(lalo: LaloUp) -> None:
    client = openai_client(lalo)
    _, asked = chat(client, "short", STORY, max_tokens=200, seed=4)
    _, unasked = chat(client, "short", STORY)
    for reply in (asked, unasked):
        assert reply.usage.completion_tokens == CAP
        assert reply.choices[0].finish_reason == "length"
    streamed = client.chat.completions.create(
        model="short", messages=[{"role": "user", "content": STORY}], max_tokens=300,
        stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in streamed if chunk.usage is not None]
    assert usage[-1].completion_tokens == CAP

    message = anthropic.Anthropic(base_url=lalo.url, api_key="unused", timeout=120).messages.create(
        model="short", max_tokens=1024, system=SYSTEM,
        messages=[{"role": "user", "content": STORY}])
    assert message.usage.output_tokens == CAP and message.stop_reason == "max_tokens"

    ollama_client = ollama.Client(host=lalo.url, timeout=120)
    reply = ollama_client.chat(model="short", messages=[{"role": "user", "content": STORY}],
                               options={"num_predict": 400})
    assert reply.eval_count == CAP and reply.done_reason == "length"
    generated = ollama_client.generate(model="short", prompt=STORY)  # no num_predict at all
    assert generated.eval_count == CAP and generated.done_reason == "length"

    native = httpx.post(f"{lalo.url}/completion", timeout=120, json={
        "model": "short", "prompt": STORY, "n_predict": 100, "ignore_eos": True})  # no template
    assert native.json()["tokens_predicted"] == CAP

    changes = [entry.get("params_changed") for entry in activity(lalo, "short", 7)]
    assert changes == [
        {"max_tokens": [200, CAP], "seed": [4, None]},  # seed is stripped
        {"max_tokens": [None, CAP]},
        {"max_tokens": [300, CAP]},
        {"max_tokens": [1024, CAP]},
        {"max_tokens": [400, CAP]},
        {"max_tokens": [None, CAP]},
        {"max_tokens": [100, CAP]},
    ]
