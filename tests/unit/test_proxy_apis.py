"""The pure parts of the model routes and the Ollama API: form parsing, option and shape mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.config import load_config
from launcher.engines.llama_server import chat_template_args
from launcher.errors import ConfigError
from launcher.proxy.anthropic import AnthropicErrors
from launcher.proxy.auth import AuthMiddleware
from launcher.proxy.errors import error_body, sse_error_event
from launcher.proxy.ollama_convert import (
    OllamaRequestError,
    counters,
    ollama_tool_calls,
    openai_messages,
    parse_keep_alive,
    response_format,
    sampling_fields,
)
from launcher.proxy.routes import MODEL_ROUTES, FormError, form_field

BOUNDARY = "----lalo-test-boundary"


def multipart(fields: list[tuple[str, bytes, str | None]]) -> bytes:
    parts = []
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
        if filename:
            head += "Content-Type: audio/wav\r\n"
        parts.append(head.encode() + b"\r\n" + value + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}".encode()


def test_form_field_finds_model_after_a_large_file_part() -> None:
    audio = bytes(range(256)) * 4096  # 1 MiB, with CR/LF and dashes inside
    body = multipart([("file", audio, "a.wav"), ("model", b"whisper-small", None),
                      ("language", b"en", None)])
    assert form_field(body, CONTENT_TYPE, "model") == "whisper-small"
    assert form_field(body, CONTENT_TYPE, "language") == "en"
    assert form_field(body, CONTENT_TYPE, "prompt") is None


def test_form_field_errors() -> None:
    with pytest.raises(FormError, match="expected multipart/form-data, got application/json"):
        form_field(b"{}", b"application/json", "model")
    with pytest.raises(FormError, match="without a boundary"):
        form_field(b"", b"multipart/form-data", "model")
    with pytest.raises(FormError, match="longer than 1024 bytes"):
        form_field(multipart([("model", b"x" * 5000, None)]), CONTENT_TYPE, "model")


def test_every_route_of_the_issue_is_a_model_route() -> None:
    wanted = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages",
              "/v1/messages/count_tokens", "/v1/responses", "/v1/responses/input_tokens",
              "/v1/rerank", "/v1/reranking", "/rerank", "/v1/audio/transcriptions", "/infill",
              "/tokenize", "/detokenize", "/apply-template", "/v1/chat/completions/input_tokens",
              "/completion", "/completions", "/embedding", "/embeddings"}
    assert wanted <= set(MODEL_ROUTES)
    assert MODEL_ROUTES["/v1/audio/transcriptions"].model_in == "form"


@pytest.mark.parametrize(("value", "seconds"), [
    (None, None), (0, 0.0), ("0", 0.0), (300, 300.0), ("300", 300.0), ("5m", 300.0),
    ("1h30m", 5400.0), ("1.5s", 1.5), ("250ms", 0.25), ("-1", -1.0), ("-1m", -60.0),
])
def test_keep_alive_durations(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "m", "", "5x", True, [1]])
def test_keep_alive_rejects(value: object) -> None:
    with pytest.raises(OllamaRequestError, match="keep_alive"):
        parse_keep_alive(value)


def test_options_map_to_llama_server_fields() -> None:
    fields = sampling_fields({"temperature": 0, "top_p": 0.9, "top_k": 5, "seed": 7,
                              "num_predict": 12, "stop": ["\n"], "repeat_penalty": 1.1,
                              "num_ctx": 4096, "num_thread": 2})
    assert fields == {"temperature": 0, "top_p": 0.9, "top_k": 5, "seed": 7, "max_tokens": 12,
                      "stop": ["\n"], "repeat_penalty": 1.1}
    assert sampling_fields({"num_predict": -1}) == {}
    with pytest.raises(OllamaRequestError, match=r"options\.temprature: unknown option"):
        sampling_fields({"temprature": 1})


def test_format_to_response_format() -> None:
    assert response_format("json") == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert response_format(schema) == {"type": "json_schema",
                                       "json_schema": {"name": "format", "schema": schema}}
    assert response_format(None) is None
    with pytest.raises(OllamaRequestError, match="format"):
        response_format("yaml")


def test_tool_calls_both_ways() -> None:
    messages = openai_messages([
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C", "tool_name": "get_weather"},
    ])
    call = messages[0]["tool_calls"][0]
    assert call["type"] == "function" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert messages[1] == {"role": "tool", "content": "18 C", "name": "get_weather"}
    back = ollama_tool_calls([{"id": "c1", "type": "function",
                               "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}])
    assert back == [{"id": "c1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]


def test_counters_in_nanoseconds() -> None:
    stats = counters({"prompt_tokens": 9, "completion_tokens": 4},
                     {"prompt_n": 9, "prompt_ms": 12.5, "predicted_n": 4, "predicted_ms": 80.0},
                     total_seconds=0.5, load_seconds=0.25)
    assert stats == {"total_duration": 500_000_000, "load_duration": 250_000_000,
                     "prompt_eval_count": 9, "prompt_eval_duration": 12_500_000,
                     "eval_count": 4, "eval_duration": 80_000_000}


async def test_anthropic_errors_rewrite_only_errors_under_messages() -> None:
    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        status = 404 if scope["path"].endswith("/missing") else 200
        body = error_body(404, "unknown model 'x'") if status == 404 else b'{"ok": true}'
        await send({"type": "http.response.start", "status": status,  # type: ignore[operator]
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})  # type: ignore[operator]

    async def call(path: str) -> tuple[int, dict[str, object]]:
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        await AnthropicErrors(app)({"type": "http", "path": path}, None, send)  # type: ignore[arg-type]
        return int(sent[0]["status"]), json.loads(sent[1]["body"])  # type: ignore[arg-type,call-overload]

    assert await call("/v1/messages/missing") == (404, {
        "type": "error", "error": {"type": "not_found_error", "message": "unknown model 'x'"}})
    assert await call("/v1/messages") == (200, {"ok": True})
    assert (await call("/v1/chat/missing"))[1]["error"]["code"] == "model_not_found"  # type: ignore[index]


async def test_anthropic_stream_error_event() -> None:
    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        await send({"type": "http.response.start", "status": 200,  # type: ignore[operator]
                    "headers": [(b"content-type", b"text/event-stream")]})
        broken = sse_error_event(502, "smol: broke off", "upstream_failed")
        for chunk in (b"event: ping\ndata: {}\n\n", broken):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})  # type: ignore[operator]

    sent: list[bytes] = []

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.body":
            sent.append(message["body"])  # type: ignore[arg-type]

    await AnthropicErrors(app)({"type": "http", "path": "/v1/messages"}, None, send)  # type: ignore[arg-type]
    assert sent[0] == b"event: ping\ndata: {}\n\n"
    assert sent[1] == (b'event: error\ndata: {"type": "error", "error": {"type": "api_error", '
                       b'"message": "smol: broke off"}}\n\n')


async def test_keys_as_bearer_or_x_api_key() -> None:
    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        await send({"type": "http.response.start", "status": 204, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    async def status(headers: list[tuple[bytes, bytes]]) -> int:
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/messages", "headers": headers}
        await AuthMiddleware(app, api_keys=["k1"], admin_token="admin")(scope, None, send)  # type: ignore[arg-type]
        return int(sent[0]["status"])  # type: ignore[call-overload]

    assert await status([(b"x-api-key", b"k1")]) == 204
    assert await status([(b"authorization", b"Bearer k1")]) == 204
    assert await status([(b"x-api-key", b"k2")]) == 401
    assert await status([]) == 401


def test_chat_template_config(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"")
    (tmp_path / "tool.jinja").write_text("{{ messages }}")
    config = tmp_path / "lalo.yaml"
    config.write_text("models:\n  a: {file: m.gguf, chat_template: tool.jinja}\n"
                      "  b: {file: m.gguf, chat_template: chatml}\n  c: {file: m.gguf}\n")
    loaded = load_config(config)
    assert loaded.chat_template("a") == str(tmp_path / "tool.jinja")
    assert loaded.chat_template("b") == "chatml"
    assert loaded.chat_template("c") is None
    assert chat_template_args(str(tmp_path / "tool.jinja")) == [
        "--jinja", "--chat-template-file", str(tmp_path / "tool.jinja")]
    assert chat_template_args("chatml") == ["--no-jinja", "--chat-template", "chatml"]
    config.write_text("models:\n  a: {file: m.gguf, chat_template: missing.jinja}\n")
    with pytest.raises(ConfigError, match=r"models\.a\.chat_template: .*missing\.jinja: no such file"):
        load_config(config).chat_template("a")
    config.write_text("models:\n  a: {file: m.gguf, chat_template: 'Chat ML!'}\n")
    with pytest.raises(ConfigError, match="chat_template"):
        load_config(config)
    config.write_text("models:\n  a: {file: m.gguf, engine: llamafile, chat_template: chatml}\n")
    with pytest.raises(ConfigError, match="chat_template needs the llama-server engine"):
        load_config(config)
