"""Every model-bearing route reaches the model it names: real SmolLM2 and Gemma 3 under `lalo up`.

Which server answered is told three ways: lalo's own count of requests per model (the
routing decision), the `model` llama-server puts in its answers (`--alias` is lalo's name),
and answers that differ between the two vocabularies (tokenize, detokenize, templates,
embedding widths).
"""

from __future__ import annotations

import io
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
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

CHAT = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]


@pytest.fixture(scope="module")
def lalo(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path, smollm2: Path,
         gemma3: Path) -> Iterator[LaloUp]:
    """SmolLM2 preloaded; Gemma 3 on demand (with llama.cpp's built-in gemma template, its
    file has none); one embeddings server of each (their widths differ: 576 and 640) and one
    reranking server of each (neither is a trained reranker: the scores mean nothing, the
    route and the answer's shape are what is tested)."""
    tmp = tmp_path_factory.mktemp("apis")
    embed = {"ctx_size": 512, "embeddings": True, "preload": False, "args": ["--pooling", "mean"]}
    rerank = {"ctx_size": 512, "preload": False, "args": ["--reranking"]}
    config = write_config(
        tmp / "lalo.yaml",
        {
            "smol": {"file": str(smollm2), "ctx_size": 2048, "aliases": ["smollm2"]},
            "gemma": {"file": str(gemma3), "ctx_size": 2048, "preload": False,
                      "chat_template": "gemma"},
            "smol-embed": {"file": str(smollm2), **embed},
            "gemma-embed": {"file": str(gemma3), **embed},
            "smol-rerank": {"file": str(smollm2), **rerank},
            "gemma-rerank": {"file": str(gemma3), **rerank},
        },
        engines={"llama_server": {"path": str(llama_server_bin)}},
        supervisor=FAST_SUPERVISOR,
    )
    with LaloUp(config, lalo_env(tmp / "state", tmp / "config")) as up:
        up.wait_state("smol", "ready")
        yield up


def requests_by_model(lalo: LaloUp) -> dict[str, int]:
    return {row["name"]: row["requests"] for row in lalo.status()["models"]}


def post(lalo: LaloUp, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(lalo.url + path, timeout=180, **kwargs)


def test_gemma_loads_on_demand_while_smollm2_is_loaded(lalo: LaloUp) -> None:
    assert lalo.model("gemma")["state"] == "stopped"
    assert lalo.model("smol")["state"] == "ready"
    gemma = post(lalo, "/v1/chat/completions", json={
        "model": "gemma", "messages": CHAT, "max_tokens": 8, "temperature": 0})
    assert gemma.status_code == 200, gemma.text
    assert gemma.json()["model"] == "gemma"
    assert gemma.json()["choices"][0]["message"]["content"].strip()
    smol = post(lalo, "/v1/chat/completions", json={
        "model": "smollm2", "messages": CHAT, "max_tokens": 16, "temperature": 0})
    assert smol.json()["model"] == "smol"
    assert "Paris" in smol.json()["choices"][0]["message"]["content"]
    assert lalo.model("smol")["state"] == "ready" and lalo.model("gemma")["state"] == "ready"


def _wav() -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"\x00\x00" * 1600)
    return buffer.getvalue()


def _json(body: dict[str, Any]) -> Callable[[str], dict[str, Any]]:
    return lambda model: {"json": {"model": model, **body}}


def _transcription(model: str) -> dict[str, Any]:
    # the model field comes after the audio: the proxy must find it anywhere in the form
    return {"files": {"file": ("a.wav", _wav(), "audio/wav")}, "data": {"model": model}}


GENERATE = {"messages": CHAT, "max_tokens": 2}
PROMPT = {"prompt": "The capital of France is", "max_tokens": 2, "n_predict": 2}
RERANK = {"query": "capital of France", "documents": ["Paris", "Berlin"]}
# route -> (request for a model, the two models it is tried on)
ROUTES: dict[str, tuple[Callable[[str], dict[str, Any]], tuple[str, str]]] = {
    "/v1/chat/completions": (_json(GENERATE), ("smol", "gemma")),
    "/v1/completions": (_json(PROMPT), ("smol", "gemma")),
    "/completion": (_json(PROMPT), ("smol", "gemma")),
    "/completions": (_json(PROMPT), ("smol", "gemma")),
    "/v1/messages": (_json(GENERATE), ("smol", "gemma")),
    "/v1/messages/count_tokens": (_json({"messages": CHAT}), ("smol", "gemma")),
    "/v1/responses": (_json({"input": "Hello", "max_output_tokens": 2}), ("smol", "gemma")),
    "/v1/responses/input_tokens": (_json({"input": "Hello"}), ("smol", "gemma")),
    "/v1/chat/completions/input_tokens": (_json({"messages": CHAT}), ("smol", "gemma")),
    "/infill": (_json({"input_prefix": "def add(a, b):\n    return ", "input_suffix": "\n",
                       "n_predict": 2}), ("smol", "gemma")),
    "/tokenize": (_json({"content": "Paris"}), ("smol", "gemma")),
    "/detokenize": (_json({"tokens": [100, 200, 300]}), ("smol", "gemma")),
    "/apply-template": (_json({"messages": CHAT}), ("smol", "gemma")),
    "/v1/embeddings": (_json({"input": "Paris"}), ("smol-embed", "gemma-embed")),
    "/embedding": (_json({"content": "Paris"}), ("smol-embed", "gemma-embed")),
    "/embeddings": (_json({"content": "Paris"}), ("smol-embed", "gemma-embed")),
    "/v1/rerank": (_json(RERANK), ("smol-rerank", "gemma-rerank")),
    "/v1/reranking": (_json(RERANK), ("smol-rerank", "gemma-rerank")),
    "/rerank": (_json(RERANK), ("smol-rerank", "gemma-rerank")),
    "/v1/audio/transcriptions": (_transcription, ("smol", "gemma")),
}


# llama-server's own 501 (`not_supported_error`): neither model has FIM tokens
UNSUPPORTED = {"/infill"}
# lalo's 400 before the model is asked (launcher/models/capabilities.py): no audio input
REFUSED = {"/v1/audio/transcriptions"}


@pytest.mark.parametrize("route", list(ROUTES))
def test_every_route_reaches_the_named_model(lalo: LaloUp, route: str) -> None:
    request, models = ROUTES[route]
    for name in models:
        before = requests_by_model(lalo)
        response = post(lalo, route, **request(name))
        after = requests_by_model(lalo)
        changed = {model: after[model] - before[model] for model in after if after[model] != before[model]}
        body = response.json()
        if route in REFUSED:
            assert (response.status_code, changed) == (400, {}), (route, name, body)
            # the form's model field was found after the audio: the message names it
            assert body["error"]["code"] == "model_capability"
            assert body["error"]["message"].startswith(f"model {name} has no audio input")
            continue
        assert changed == {name: 1}, (route, name, response.status_code, response.text[:300])
        if route in UNSUPPORTED:  # the model server's own answer, not an error lalo made
            assert response.status_code == 501, (route, name, body)
            assert body["error"]["type"] == "not_supported_error"
            continue
        assert response.status_code == 200, (route, name, response.text[:300])
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            assert body["model"] == name, (route, body)


def test_answers_differ_by_the_model_named(lalo: LaloUp) -> None:
    def answer(path: str, model: str, **body: Any) -> Any:
        response = post(lalo, path, json={"model": model, **body})
        assert response.status_code == 200, response.text
        return response.json()

    def direct(path: str, model: str, **body: Any) -> Any:
        return httpx.post(f"{lalo.url}/upstream/{model}{path}", json=body, timeout=60).json()

    for model in ("smol", "gemma"):
        assert answer("/tokenize", model, content="Paris") == direct("/tokenize", model, content="Paris")
        tokens = [100, 200]
        assert answer("/detokenize", model, tokens=tokens) == direct("/detokenize", model, tokens=tokens)
    assert answer("/tokenize", "smol", content="Paris") != answer("/tokenize", "gemma", content="Paris")
    assert "<|im_start|>" in answer("/apply-template", "smol", messages=CHAT)["prompt"]
    assert "<start_of_turn>user" in answer("/apply-template", "gemma", messages=CHAT)["prompt"]
    widths = {model: len(answer("/v1/embeddings", model, input="Paris")["data"][0]["embedding"])
              for model in ("smol-embed", "gemma-embed")}
    assert widths == {"smol-embed": 576, "gemma-embed": 640}
    count = answer("/v1/messages/count_tokens", "smol", messages=CHAT)["input_tokens"]
    assert count == answer("/v1/chat/completions/input_tokens", "smol", messages=CHAT)["input_tokens"]


def test_anthropic_stream_passes_through_and_disconnect_stops_it(lalo: LaloUp) -> None:
    before = tokens_predicted(lalo, "smol")
    body = {"model": "smol", "max_tokens": 1500, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Count to a thousand."}]}
    events: list[str] = []
    with httpx.stream("POST", lalo.url + "/v1/messages", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event:"):
                events.append(line.removeprefix("event:").strip())
            if events.count("content_block_delta") >= 5:
                break  # leave mid-stream
    assert events[0] == "message_start"
    wait_until(lambda: not generating(lalo, "smol"), 5.0,
               message="llama-server to stop generating after the client left")
    assert tokens_predicted(lalo, "smol") - before < 1500


def test_route_errors(lalo: LaloUp) -> None:
    unknown = post(lalo, "/v1/messages", json={"model": "claude-9", "max_tokens": 4, "messages": CHAT})
    assert unknown.status_code == 404
    assert unknown.json() == {"type": "error", "error": {
        "type": "not_found_error",
        "message": "unknown model 'claude-9'; known: smol, smollm2, gemma, smol-embed, "
                   "gemma-embed, smol-rerank, gemma-rerank"}}
    no_model = post(lalo, "/tokenize", json={"content": "x"})
    assert no_model.status_code == 400 and no_model.json()["error"]["code"] == "model_required"
    form = post(lalo, "/v1/audio/transcriptions", files={"file": ("a.wav", _wav(), "audio/wav")})
    assert form.status_code == 400
    assert form.json()["error"]["message"].startswith("missing form field 'model'")
    not_form = post(lalo, "/v1/audio/transcriptions", json={"model": "smol"})
    assert not_form.status_code == 400
    assert "expected multipart/form-data, got application/json" in not_form.json()["error"]["message"]
    wrong_method = httpx.get(lalo.url + "/v1/messages")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"  # Anthropic's shape
    nowhere = post(lalo, "/v1/nothing", json={"model": "smol"})
    assert nowhere.status_code == 404
    message = nowhere.json()["error"]["message"]
    assert message.startswith("no route POST /v1/nothing; routes: /v1/chat/completions, ")
    for route in ("/v1/messages", "/v1/audio/transcriptions", "/api/chat", "/api/tags", "/health"):
        assert route in message
