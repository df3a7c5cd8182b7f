"""Tool calls through lalo.

1. A real model: SmolLM2-135M-Instruct has no tool template of its own; with llama.cpp's
   Hermes 2 Pro template (`chat_template:` in lalo.yaml) and two earlier tool calls in the
   conversation, llama-server parses its answer into `tool_calls` (OpenAI), `tool_use`
   (Anthropic) and Ollama's `tool_calls`. Without the examples it answers in prose with every
   template tried (docs/apis.md).
2. `tools`, `tool_choice`, `tool_calls` and tool results pass unchanged: the model server is a
   small real HTTP server standing in for llama-server (tests/support/recording_server.py)
   that records what lalo sent and answers with a tool call, so the test sees both sides.
"""

from __future__ import annotations

import json
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from launcher.engines.source import pinned_source
from tests.support.lalo import FAST_SUPERVISOR, LaloUp, lalo_env, write_config

pytestmark = pytest.mark.integration

RECORDER = Path(__file__).resolve().parent.parent / "support" / "recording_server.py"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


HERMES = "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja"


def _weather_call(number: int, city: str) -> dict[str, Any]:
    return {"role": "assistant", "content": "", "tool_calls": [{
        "id": f"call_{number}", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}


# two earlier turns that called the tool: what makes a 135M model answer with a call
TWO_SHOT: list[dict[str, Any]] = [
    {"role": "user", "content": "What is the weather in Berlin?"}, _weather_call(1, "Berlin"),
    {"role": "tool", "tool_call_id": "call_1", "content": "12 C"},
    {"role": "assistant", "content": "It is 12 C in Berlin."},
    {"role": "user", "content": "What is the weather in Rome?"}, _weather_call(2, "Rome"),
    {"role": "tool", "tool_call_id": "call_2", "content": "20 C"},
    {"role": "assistant", "content": "It is 20 C in Rome."},
    {"role": "user", "content": "What is the weather in Paris?"},
]


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path,
         smollm2: Path) -> Iterator[LaloUp]:
    template = pinned_source().tree / "models" / "templates" / HERMES  # the source we build from
    tmp = tmp_path_factory.mktemp("real-tools")
    config = write_config(
        tmp / "lalo.yaml",
        {"smol-tool": {"file": str(smollm2), "ctx_size": 2048, "chat_template": str(template)}},
        engines={"llama_server": {"path": str(llama_server_bin)}},
        supervisor=FAST_SUPERVISOR,
    )
    with LaloUp(config, lalo_env(tmp / "state", tmp / "config")) as up:
        up.wait_state("smol-tool", "ready")
        yield up


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_real_model_tool_call_openai(real: LaloUp, choice: str) -> None:
    api = openai.OpenAI(base_url=real.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    reply = api.chat.completions.create(model="smol-tool", temperature=0, max_tokens=40,
                                        tools=[WEATHER], tool_choice=choice,  # type: ignore[list-item,arg-type]
                                        messages=TWO_SHOT)  # type: ignore[arg-type]
    calls = reply.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1, reply
    function = calls[0].function  # type: ignore[union-attr]
    assert function.name == "get_weather"
    assert json.loads(function.arguments) == {"city": "Paris"}
    assert reply.choices[0].finish_reason == "tool_calls"


def test_real_model_tool_call_anthropic(real: LaloUp) -> None:
    messages: list[dict[str, Any]] = []
    for message in TWO_SHOT:  # the same conversation in Anthropic's blocks
        if message.get("tool_calls"):
            call = message["tool_calls"][0]
            messages.append({"role": "assistant", "content": [{
                "type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                "input": json.loads(call["function"]["arguments"])}]})
        elif message["role"] == "tool":
            messages.append({"role": "user", "content": [{
                "type": "tool_result", "tool_use_id": message["tool_call_id"],
                "content": message["content"]}]})
        else:
            messages.append(message)
    claude = anthropic.Anthropic(base_url=real.url, api_key="unused", max_retries=0, timeout=300)
    reply = claude.messages.create(
        model="smol-tool", max_tokens=40, messages=messages,  # type: ignore[arg-type]
        tools=[{"name": "get_weather", "description": WEATHER["function"]["description"],
                "input_schema": WEATHER["function"]["parameters"]}],
        tool_choice={"type": "any"}, extra_body={"temperature": 0})
    uses = [block for block in reply.content if block.type == "tool_use"]
    assert len(uses) == 1, reply
    assert uses[0].name == "get_weather" and uses[0].input == {"city": "Paris"}
    assert reply.stop_reason == "tool_use"


def test_real_model_tool_call_ollama(real: LaloUp) -> None:
    messages: list[dict[str, Any]] = []
    for message in TWO_SHOT:  # Ollama's shape: arguments as objects, results by tool name
        if message.get("tool_calls"):
            function = message["tool_calls"][0]["function"]
            messages.append({"role": "assistant", "content": "", "tool_calls": [{"function": {
                "name": function["name"], "arguments": json.loads(function["arguments"])}}]})
        elif message["role"] == "tool":
            messages.append({"role": "tool", "content": message["content"], "tool_name": "get_weather"})
        else:
            messages.append(message)
    client = ollama.Client(host=real.url, timeout=300)
    reply = client.chat(model="smol-tool", messages=messages, tools=[WEATHER],
                        options={"temperature": 0, "num_predict": 40})
    calls = list(reply.message.tool_calls or [])
    assert len(calls) == 1, reply
    assert calls[0].function.name == "get_weather" and calls[0].function.arguments == {"city": "Paris"}


class Recorded:
    def __init__(self, path: Path) -> None:
        self.path = path

    def take(self) -> list[dict[str, Any]]:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        self.path.write_text("")
        return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Iterator[tuple[LaloUp, Recorded]]:
    tmp = tmp_path_factory.mktemp("tools")
    server = tmp / "llama-server"
    server.write_text(f"#!/bin/sh\nexec {sys.executable} {RECORDER} \"$@\"\n")
    server.chmod(server.stat().st_mode | stat.S_IXUSR)
    record = tmp / "requests.jsonl"
    config = write_config(
        tmp / "lalo.yaml",
        {"tool": {"file": str(smollm2), "ctx_size": 512, "env": {"RECORD_TO": str(record)}}},
        engines={"llama_server": {"path": str(server)}},
        supervisor=FAST_SUPERVISOR,
    )
    with LaloUp(config, lalo_env(tmp / "state", tmp / "config")) as up:
        up.wait_state("tool", "ready")
        yield up, Recorded(record)


def test_openai_tool_round_trip_passes_unchanged(stand_in: tuple[LaloUp, Recorded]) -> None:
    lalo, recorded = stand_in
    recorded.take()
    request = {"model": "tool", "tools": [WEATHER], "parallel_tool_calls": False,
               "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
               "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    first = httpx.post(lalo.url + "/v1/chat/completions", json=request, timeout=30).json()
    call = first["choices"][0]["message"]["tool_calls"][0]
    assert call == {"id": "call_lalo_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    follow_up = {**request, "tool_choice": "auto", "messages": [
        *request["messages"],
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "18 C and sunny"}]}
    api = openai.OpenAI(base_url=lalo.url + "/v1", api_key="unused", max_retries=0)
    second = api.chat.completions.create(**follow_up)
    assert second.choices[0].message.content == "The tool said: 18 C and sunny"
    sent = recorded.take()
    assert [entry["path"] for entry in sent] == ["/v1/chat/completions"] * 2
    # tools, tool_choice: exactly as the client sent them; asked as a stream (assemble.py)
    assert sent[0]["body"] == {**request, "stream": True,
                               "stream_options": {"include_usage": True}}
    assert sent[1]["body"]["messages"] == follow_up["messages"]  # the tool call and its result


def test_openai_streamed_tool_call(stand_in: tuple[LaloUp, Recorded]) -> None:
    lalo, _ = stand_in
    api = openai.OpenAI(base_url=lalo.url + "/v1", api_key="unused", max_retries=0)
    chunks = list(api.chat.completions.create(
        model="tool", tools=[WEATHER], tool_choice="required", stream=True,  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Weather in Paris?"}]))
    calls = [call for chunk in chunks for call in (chunk.choices[0].delta.tool_calls or [])]
    assert calls[0].function is not None and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_tool_calls_translated(stand_in: tuple[LaloUp, Recorded], stream: bool) -> None:
    lalo, recorded = stand_in
    recorded.take()
    client = ollama.Client(host=lalo.url)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    if stream:
        parts = list(client.chat(model="tool", messages=messages, tools=[WEATHER], stream=True))
        calls = [call for part in parts for call in (part.message.tool_calls or [])]
        assert parts[-1].done
    else:
        reply = client.chat(model="tool", messages=messages, tools=[WEATHER])
        calls = list(reply.message.tool_calls or [])
    assert len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == {"city": "Paris"}  # Ollama's shape: an object
    messages += [{"role": "assistant", "content": "", "tool_calls": [
                     {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                 {"role": "tool", "content": "18 C", "tool_name": "get_weather"}]
    final = client.chat(model="tool", messages=messages, tools=[WEATHER])
    assert final.message.content == "The tool said: 18 C"
    sent = recorded.take()
    assert sent[0]["body"]["tools"] == [WEATHER]
    assistant, result = sent[-1]["body"]["messages"][1:]
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert result == {"role": "tool", "content": "18 C", "name": "get_weather"}
