"""The official clients against `lalo up` with the real SmolLM2-135M-Instruct: openai, anthropic,
LangChain's ChatOpenAI. lalo runs with an API key: the OpenAI clients send it as a bearer token,
Anthropic's as `x-api-key`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI

from tests.support.lalo import FAST_SUPERVISOR, LaloUp, lalo_env, write_config

pytestmark = pytest.mark.integration

KEY = "sk-lalo-sdk-test"
QUESTION = "What is the capital of France? Answer with one word."
# this anthropic SDK has no `temperature` argument any more; llama-server still reads it
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def lalo(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path,
         smollm2: Path) -> Iterator[LaloUp]:
    tmp = tmp_path_factory.mktemp("sdks")
    config = write_config(
        tmp / "lalo.yaml",
        {
            "smol": {"file": str(smollm2), "ctx_size": 2048},
            "smol-embed": {"file": str(smollm2), "ctx_size": 512, "embeddings": True,
                           "preload": False, "args": ["--pooling", "mean"]},
        },
        engines={"llama_server": {"path": str(llama_server_bin)}},
        supervisor=FAST_SUPERVISOR,
        proxy={"api_keys": [KEY]},
    )

    class Keyed(LaloUp):
        def headers(self) -> dict[str, str]:
            return {"Authorization": f"Bearer {KEY}"}

    with Keyed(config, lalo_env(tmp / "state", tmp / "config")) as up:
        up.wait_state("smol", "ready")
        yield up


@pytest.fixture
def oai(lalo: LaloUp) -> openai.OpenAI:
    return openai.OpenAI(base_url=lalo.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture
def claude(lalo: LaloUp) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=lalo.url, api_key=KEY, max_retries=0, timeout=120)


# --- openai ---------------------------------------------------------------------------------------
def test_openai_chat(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model="smol", temperature=0, max_tokens=16,
                                        messages=[{"role": "user", "content": QUESTION}])
    assert reply.model == "smol"
    assert "Paris" in (reply.choices[0].message.content or "")


def test_openai_stream_equals_the_whole_reply(oai: openai.OpenAI) -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Name three colours."}]
    whole = oai.chat.completions.create(model="smol", temperature=0, seed=42, max_tokens=24,
                                        messages=messages)
    pieces = [chunk.choices[0].delta.content or "" for chunk in oai.chat.completions.create(
        model="smol", temperature=0, seed=42, max_tokens=24, messages=messages, stream=True)
        if chunk.choices]
    assert len([p for p in pieces if p]) > 1  # streamed token by token
    assert "".join(pieces) == whole.choices[0].message.content


def test_openai_completions_with_logprobs(oai: openai.OpenAI) -> None:
    reply = oai.completions.create(model="smol", prompt="The capital of France is", max_tokens=4,
                                   temperature=0, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    # llama-server answers in the chat shape (`content`: token, logprob, top_logprobs), not
    # the legacy `tokens` / `token_logprobs` lists; lalo passes it on as it is
    entries = (logprobs.model_extra or {})["content"]
    assert len(entries) == 4
    assert "".join(entry["token"] for entry in entries) == reply.choices[0].text
    assert entries[0]["token"] == " Paris"
    assert all(entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2 for entry in entries)


def test_openai_embeddings(oai: openai.OpenAI) -> None:
    result = oai.embeddings.create(model="smol-embed", input=["Paris", "Berlin"])
    assert [len(item.embedding) for item in result.data] == [576, 576]
    assert result.data[0].embedding != result.data[1].embedding


def test_openai_json_schema_extraction(oai: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    reply = oai.chat.completions.create(
        model="smol", temperature=0, max_tokens=64,
        messages=[{"role": "user", "content": "Extract the person: John Smith is 42 years old."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}})
    person = json.loads(reply.choices[0].message.content or "")
    jsonschema.validate(person, schema)
    assert person == {"name": "John Smith", "age": 42}


def test_openai_responses_api(oai: openai.OpenAI) -> None:
    response = oai.responses.create(model="smol", input=QUESTION, temperature=0, max_output_tokens=16)
    assert response.model == "smol"
    assert "Paris" in response.output_text


# --- anthropic ------------------------------------------------------------------------------------
def test_anthropic_messages(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model="smol", max_tokens=16, extra_body=GREEDY,
                                     messages=[{"role": "user", "content": QUESTION}])
    assert message.model == "smol"
    assert message.content[0].type == "text" and "Paris" in message.content[0].text
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


def test_anthropic_streaming(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model="smol", max_tokens=16, extra_body=GREEDY,
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1
    assert "Paris" in "".join(pieces)
    assert final.content[0].type == "text" and final.content[0].text == "".join(pieces)


def test_anthropic_count_tokens(claude: anthropic.Anthropic) -> None:
    short = claude.messages.count_tokens(model="smol", messages=[{"role": "user", "content": "Hi"}])
    long = claude.messages.count_tokens(model="smol", messages=[{"role": "user", "content": QUESTION}])
    assert 0 < short.input_tokens < long.input_tokens


def test_anthropic_errors_map_to_sdk_exceptions(lalo: LaloUp, claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="claude-9", max_tokens=4,
                               messages=[{"role": "user", "content": "Hi"}])
    assert missing.value.body == {"type": "error", "error": {
        "type": "not_found_error", "message": "unknown model 'claude-9'; known: smol, smol-embed"}}
    wrong = anthropic.Anthropic(base_url=lalo.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        wrong.messages.create(model="smol", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert isinstance(denied.value.body, dict)
    assert denied.value.body["error"]["type"] == "authentication_error"


# --- langchain ------------------------------------------------------------------------------------
def test_langchain_chat_openai_invoke_and_stream(lalo: LaloUp) -> None:
    chat = ChatOpenAI(base_url=lalo.url + "/v1", api_key=KEY, model="smol",  # type: ignore[arg-type]
                      temperature=0, max_tokens=16, max_retries=0)  # type: ignore[call-arg]
    reply = chat.invoke(QUESTION)
    assert "Paris" in str(reply.content)
    chunks = list(chat.stream(QUESTION))
    assert len(chunks) > 1
    assert "".join(str(chunk.content) for chunk in chunks) == reply.content
