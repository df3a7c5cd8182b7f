"""The official `ollama` Python client against `lalo up` with the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from tests.support.lalo import (
    FAST_SUPERVISOR,
    LaloUp,
    generating,
    lalo_env,
    tokens_predicted,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France? Answer with one word."
GREEDY = {"temperature": 0, "seed": 1, "num_predict": 16}


@pytest.fixture(scope="module")
def lalo(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path,
         smollm2: Path) -> Iterator[LaloUp]:
    tmp = tmp_path_factory.mktemp("ollama")
    config = write_config(
        tmp / "lalo.yaml",
        {
            "smol": {"file": str(smollm2), "ctx_size": 2048},
            "smol-lazy": {"file": str(smollm2), "ctx_size": 512, "preload": False},
            "smol-embed": {"file": str(smollm2), "ctx_size": 512, "embeddings": True,
                           "preload": False, "args": ["--pooling", "mean"]},
        },
        engines={"llama_server": {"path": str(llama_server_bin)}},
        supervisor=FAST_SUPERVISOR,
    )
    with LaloUp(config, lalo_env(tmp / "state", tmp / "config")) as up:
        up.wait_state("smol", "ready")
        yield up


@pytest.fixture
def client(lalo: LaloUp) -> ollama.Client:
    return ollama.Client(host=lalo.url, timeout=120)


def test_chat(client: ollama.Client) -> None:
    reply = client.chat(model="smol", messages=[{"role": "user", "content": QUESTION}],
                        options=GREEDY)
    assert reply.model == "smol"
    assert reply.message.role == "assistant" and "Paris" in (reply.message.content or "")
    assert reply.done and reply.done_reason == "stop"
    assert reply.prompt_eval_count and reply.eval_count and reply.eval_count <= 16
    assert reply.total_duration and reply.eval_duration and reply.total_duration > reply.eval_duration


def test_chat_stream_equals_the_whole_reply(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat(model="smol", messages=messages, options=GREEDY)
    parts = list(client.chat(model="smol", messages=messages, options=GREEDY, stream=True))
    assert all(not part.done for part in parts[:-1]) and parts[-1].done
    assert len(parts) > 3
    assert "".join(part.message.content or "" for part in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count
    assert parts[-1].done_reason == "length" if whole.eval_count == 16 else "stop"


def test_generate_and_streaming(client: ollama.Client) -> None:
    reply = client.generate(model="smol", prompt=QUESTION, options=GREEDY)
    assert "Paris" in reply.response and reply.done
    parts = list(client.generate(model="smol", prompt=QUESTION, options=GREEDY, stream=True))
    assert parts[-1].done and parts[-1].eval_count == reply.eval_count
    assert "".join(part.response or "" for part in parts) == reply.response
    raw = client.generate(model="smol", prompt="The capital of France is", raw=True,
                          options={"temperature": 0, "num_predict": 3})
    assert raw.eval_count == 3 and raw.done_reason == "length"


def test_format_json_schema(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    reply = client.chat(model="smol", format=schema, options={"temperature": 0, "num_predict": 64},
                        messages=[{"role": "user",
                                   "content": "Extract the person: John Smith is 42 years old."}])
    assert json.loads(reply.message.content or "") == {"name": "John Smith", "age": 42}


def test_tags_ps_show_version(lalo: LaloUp, client: ollama.Client) -> None:
    tags = client.list()
    assert [model.model for model in tags.models] == ["smol", "smol-lazy", "smol-embed"]
    details = tags.models[0].details
    assert details is not None
    assert (details.format, details.family, details.quantization_level) == ("gguf", "llama", "Q4_1")
    assert details.parameter_size == "135M"
    assert tags.models[0].size and tags.models[0].size > 90 * 1024**2
    running = client.ps()
    assert "smol" in [model.model for model in running.models]
    assert "smol-lazy" not in [model.model for model in running.models]
    assert running.models[0].context_length == 2048
    shown = client.show("smol:latest")  # Ollama's default tag names the same model
    assert shown.details is not None and shown.details.family == "llama"
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert "<|im_start|>" in (shown.template or "")
    version = httpx.get(lalo.url + "/api/version").json()
    assert version["version"].count(".") == 2


def test_embed(client: ollama.Client) -> None:
    result = client.embed(model="smol-embed", input=["Paris", "Berlin"])
    assert [len(vector) for vector in result.embeddings] == [576, 576]
    assert result.prompt_eval_count and result.prompt_eval_count >= 2
    single = client.embeddings(model="smol-embed", prompt="Paris")
    assert list(single.embedding) == pytest.approx(list(result.embeddings[0]), abs=1e-5)


def test_keep_alive_zero_unloads_after_the_request(lalo: LaloUp, client: ollama.Client) -> None:
    assert lalo.model("smol-lazy")["state"] == "stopped"
    loaded = client.generate(model="smol-lazy", prompt="")  # Ollama's way to load a model
    assert loaded.done_reason == "load" and lalo.model("smol-lazy")["state"] == "ready"
    reply = client.generate(model="smol-lazy", prompt=QUESTION, keep_alive=0, options=GREEDY)
    assert "Paris" in reply.response
    wait_until(lambda: lalo.model("smol-lazy")["state"] == "stopped", 30,
               message="smol-lazy to be unloaded")
    first = client.generate(model="smol-lazy", prompt="Hi", options={"num_predict": 1},
                            keep_alive="5m")
    assert first.load_duration and first.load_duration > 0  # it loaded again, on demand
    unloaded = client.generate(model="smol-lazy", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert lalo.model("smol-lazy")["state"] == "stopped"


def test_keep_alive_duration_unloads_once_idle_that_long(lalo: LaloUp, client: ollama.Client) -> None:
    client.generate(model="smol-lazy", prompt="Hi", options={"num_predict": 1}, keep_alive="1s")
    running = {model.model: model for model in client.ps().models}
    assert "smol-lazy" in running and running["smol-lazy"].expires_at is not None
    wait_until(lambda: lalo.model("smol-lazy")["state"] == "stopped", 20,
               message="smol-lazy to be unloaded one second after its request")


def test_client_disconnect_stops_the_generation(lalo: LaloUp) -> None:
    before = tokens_predicted(lalo, "smol")
    body = {"model": "smol", "raw": True, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
            "options": {"temperature": 0, "num_predict": 1500}}  # counting: no end of its own
    with httpx.stream("POST", lalo.url + "/api/generate", json=body, timeout=60) as response:
        lines = 0
        for _line in response.iter_lines():
            lines += 1
            if lines >= 5:
                break  # leave mid-stream: the context manager closes the connection
    wait_until(lambda: not generating(lalo, "smol"), 5.0,
               message="llama-server to stop generating after the client left")
    assert tokens_predicted(lalo, "smol") - before < 1500


def test_errors_in_ollama_shape(client: ollama.Client, lalo: LaloUp) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="llama9", messages=[{"role": "user", "content": "Hi"}])
    assert missing.value.status_code == 404
    assert missing.value.error.startswith("model 'llama9' not found")
    bad = httpx.post(lalo.url + "/api/generate",
                     json={"model": "smol", "prompt": "x", "options": {"temprature": 1}})
    assert bad.status_code == 400 and bad.json()["error"].startswith("options.temprature: unknown option")
    duration = httpx.post(lalo.url + "/api/generate",
                          json={"model": "smol", "prompt": "x", "keep_alive": "soon"})
    assert duration.status_code == 400 and "keep_alive" in duration.json()["error"]
