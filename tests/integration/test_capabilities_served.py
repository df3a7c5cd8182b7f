"""What each model can serve, against `lalo up` with the real SmolLM2-135M-Instruct: listed as
its GGUF and lalo.yaml say in /v1/models, /api/tags and /api/show, and an embeddings request
to a chat model refused by the official OpenAI and Ollama clients' 400 naming the lalo setting
(not llama-server's "Start it with `--embeddings`"), before the model is loaded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.support.lalo import FAST_SUPERVISOR, LaloUp, lalo_env, write_config

pytestmark = pytest.mark.integration

SETTING = "models.smol.embeddings: true"


@pytest.fixture(scope="module")
def lalo(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path,
         smollm2: Path) -> Iterator[LaloUp]:
    tmp = tmp_path_factory.mktemp("capabilities")
    model = {"file": str(smollm2), "ctx_size": 512, "preload": False}
    config = write_config(
        tmp / "lalo.yaml",
        {
            "smol": model,
            "vectors": {**model, "embeddings": True, "args": ["--pooling", "mean"]},
        },
        engines={"llama_server": {"path": str(llama_server_bin)}},
        supervisor=FAST_SUPERVISOR,
    )
    with LaloUp(config, lalo_env(tmp / "state", tmp / "config")) as up:
        yield up


def test_the_lists_say_what_each_model_serves(lalo: LaloUp) -> None:
    models = httpx.get(f"{lalo.url}/v1/models", timeout=10).json()["data"]
    # SmolLM2's chat template takes no tools
    assert {m["id"]: m["capabilities"] for m in models} == {
        "smol": ["chat", "completion"], "vectors": ["chat", "completion", "embeddings"]}
    tags = httpx.get(f"{lalo.url}/api/tags", timeout=10).json()["models"]
    assert {m["name"]: m["capabilities"] for m in tags} == {
        "smol": ["completion"], "vectors": ["completion", "embedding"]}
    client = ollama.Client(host=lalo.url, timeout=30)
    assert client.show("smol").capabilities == ["completion"]
    assert client.show("vectors").capabilities == ["completion", "embedding"]


def test_embeddings_from_a_chat_model_name_the_setting_and_load_nothing(lalo: LaloUp) -> None:
    before = lalo.model("smol")
    assert before["state"] == "stopped"
    with pytest.raises(openai.BadRequestError) as refused:
        openai.OpenAI(base_url=lalo.url + "/v1", api_key="unused", timeout=30).embeddings.create(
            model="smol", input="hello")
    assert refused.value.status_code == 400
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "model_capability", error
    assert SETTING in error["message"] and "--pooling, mean" in error["message"]
    assert "--embeddings`" not in error["message"]
    with pytest.raises(ollama.ResponseError) as ollama_refused:
        ollama.Client(host=lalo.url, timeout=30).embed(model="smol", input="hello")
    assert ollama_refused.value.status_code == 400 and SETTING in ollama_refused.value.error
    raw = httpx.post(f"{lalo.url}/api/embeddings", json={"model": "smol", "prompt": "x"}, timeout=10)
    assert raw.status_code == 400 and SETTING in raw.json()["error"]
    after = lalo.model("smol")
    assert (after["state"], after["loads"], after["requests"]) == ("stopped", before["loads"],
                                                                   before["requests"])
    assert not lalo.children()  # no server was started for it


def test_embeddings_served_with_the_setting(lalo: LaloUp) -> None:
    client = openai.OpenAI(base_url=lalo.url + "/v1", api_key="unused", timeout=120)
    answer = client.embeddings.create(model="vectors", input=["a cat", "a dog"])
    assert len(answer.data) == 2 and len(answer.data[0].embedding) > 100
    vectors = ollama.Client(host=lalo.url, timeout=120).embed(model="vectors", input="a cat")
    assert len(vectors.embeddings) == 1
    assert vectors.embeddings[0] == pytest.approx(answer.data[0].embedding, abs=1e-3)
    # the same model still chats
    reply = client.chat.completions.create(model="vectors", max_tokens=4,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content is not None
