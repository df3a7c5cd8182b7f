"""Streams put back together into the non-streamed answer: events as llama-server writes them
(tools/server/server-task.cpp), cut at any byte, errors, and streams cut short."""

from __future__ import annotations

import json
from typing import Any

import pytest

from launcher.proxy.assemble import (
    AssemblyError,
    EventReader,
    Plan,
    assembler,
    plan,
)


def sse(*events: Any, named: bool = False) -> bytes:
    out = b""
    for event in events:
        if event == "[DONE]":
            out += b"data: [DONE]\n\n"
            continue
        name = f"event: {event['type']}\n".encode() if named else b""
        out += name + b"data: " + json.dumps(event).encode() + b"\n\n"
    return out


def assemble(kind_plan: Plan, stream: bytes, step: int = 7) -> tuple[int, Any]:
    """Feed `stream` in pieces of `step` bytes, as a socket would."""
    reader = EventReader()
    answer = assembler(kind_plan)
    for start in range(0, len(stream), step):
        for event, data in reader.feed(stream[start:start + step]):
            answer.feed(event, data)
    result = answer.answer()
    return result.status, json.loads(result.encode())


def chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0,
          **extra: Any) -> dict[str, Any]:
    return {"choices": [{"finish_reason": finish, "index": index, "delta": delta, **extra}],
            "created": 5, "id": "chatcmpl-1", "model": "m", "system_fingerprint": "b1",
            "object": "chat.completion.chunk"}


def test_plan_asks_for_a_stream_only_for_generations_not_streamed() -> None:
    chat = plan("/v1/chat/completions", {"model": "m", "messages": []})
    assert chat is not None and chat.kind == "chat"
    assert json.loads(chat.body) == {"model": "m", "messages": [], "stream": True,
                                     "stream_options": {"include_usage": True}}
    assert plan("/v1/chat/completions", {"model": "m", "stream": True}) is None
    assert plan("/v1/embeddings", {"model": "m", "input": "x"}) is None
    assert plan("/tokenize", {"model": "m", "content": "x"}) is None
    # llama-server filters only its final object by response_fields: sent as it came
    assert plan("/completion", {"model": "m", "response_fields": ["content"]}) is None
    native = plan("/completion", {"model": "m", "prompt": "x", "return_tokens": True,
                                  "stream_options": {"include_usage": True}})
    assert native is not None and native.return_tokens
    assert "stream_options" not in json.loads(native.body)
    # logprobs and stop words: llama-server's `__verbose` says whether a stop word ended it
    cmpl = plan("/v1/completions", {"model": "m", "prompt": "x", "logprobs": 1, "stop": ["."]})
    assert cmpl is not None and json.loads(cmpl.body)["verbose"] is True and not cmpl.verbose
    for path, kind in (("/v1/messages", "messages"), ("/v1/responses", "responses"),
                       ("/infill", "native"), ("/v1/completions", "completions")):
        planned = plan(path, {"model": "m"})
        assert planned is not None and planned.kind == kind


def test_event_reader_takes_events_cut_anywhere_and_skips_comments_and_done() -> None:
    stream = (b": ping\n\n" + b"event: message_start\r\ndata: {\"a\": 1}\r\n\r\n"
              + b"data: {\"b\":\n\n" + b"data: [DONE]\n\n")
    reader = EventReader()
    seen: list[tuple[str, Any]] = []
    with pytest.raises(AssemblyError, match="not JSON"):
        for byte in range(len(stream)):
            seen.extend(reader.feed(stream[byte:byte + 1]))
    assert seen == [("message_start", {"a": 1})]


def test_chat_content_reasoning_tool_calls_logprobs_and_usage() -> None:
    tool = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": ""}}
    stream = sse(
        chunk({"role": "assistant", "content": None}),
        chunk({"reasoning_content": "Think"}), chunk({"reasoning_content": "ing."}),
        chunk({"content": "Par"}, logprobs={"content": [{"token": "Par", "logprob": -0.1}]}),
        chunk({"content": "is"}, logprobs={"content": [{"token": "is", "logprob": -0.2}]}),
        chunk({"tool_calls": [tool]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": " \"Paris\"}"}}]}),
        chunk({}, finish="tool_calls"),
        {"choices": [], "created": 6, "id": "chatcmpl-1", "model": "m", "object": "x",
         "system_fingerprint": "b1", "usage": {"completion_tokens": 9, "prompt_tokens": 3,
                                               "total_tokens": 12},
         "timings": {"predicted_n": 9}},
        "[DONE]")
    status, body = assemble(plan("/v1/chat/completions", {}) or Plan("chat", b""), stream)
    assert status == 200
    assert list(body) == ["choices", "created", "model", "system_fingerprint", "object", "usage",
                          "id", "timings"]  # llama-server's order
    assert body["object"] == "chat.completion" and body["created"] == 6
    assert body["usage"]["total_tokens"] == 12 and body["timings"] == {"predicted_n": 9}
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["logprobs"] == {"content": [{"token": "Par", "logprob": -0.1},
                                              {"token": "is", "logprob": -0.2}]}
    assert choice["message"] == {
        "role": "assistant", "content": "Paris", "reasoning_content": "Thinking.",
        "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}, "id": "call_1"}]}


def test_chat_with_two_choices_keeps_them_apart_in_index_order() -> None:
    stream = sse(chunk({"content": "b"}, index=1), chunk({"content": "a"}, index=0),
                 chunk({}, finish="length", index=1), chunk({}, finish="stop", index=0), "[DONE]")
    _, body = assemble(Plan("chat", b""), stream)
    assert [(c["index"], c["message"]["content"], c["finish_reason"])
            for c in body["choices"]] == [(0, "a", "stop"), (1, "b", "length")]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "a"}


def test_completions_text_and_logprobs_less_the_stop_word() -> None:
    def part(text: str, token: str, finish: str | None = None, **extra: Any) -> dict[str, Any]:
        probs = {"content": [{"token": token, "bytes": list(token.encode())}]} if token != "-" \
            else None
        return {"choices": [{"text": text, "index": 0, "logprobs": probs,
                             "finish_reason": finish}], "created": 1, "model": "m",
                "system_fingerprint": "b", "object": "text_completion", "id": "cmpl-1", **extra}

    final = part("", "-", "stop", usage={"completion_tokens": 2},
                 __verbose={"stop_type": "word"})
    stream = sse(part(" Paris", " Paris"), part("", ""), final, "[DONE]")
    _, body = assemble(Plan("completions", b""), stream)
    choice = body["choices"][0]
    assert choice["text"] == " Paris" and choice["finish_reason"] == "stop"
    assert [p["token"] for p in choice["logprobs"]["content"]] == [" Paris"]
    assert "__verbose" not in body and body["usage"] == {"completion_tokens": 2}
    # ended by end-of-text: every token's logprobs stay, the end-of-text one too
    final["__verbose"] = {"stop_type": "eos"}
    _, body = assemble(Plan("completions", b""), sse(part(" Paris", " Paris"), part("", ""),
                                                     final, "[DONE]"))
    assert [p["token"] for p in body["choices"][0]["logprobs"]["content"]] == [" Paris", ""]


def test_native_final_object_gets_the_text_tokens_and_probabilities() -> None:
    def part(content: str, token: int) -> dict[str, Any]:
        return {"index": 0, "content": content, "tokens": [token], "stop": False, "id_slot": 0,
                "completion_probabilities": [{"token": content, "bytes": list(content.encode())}]}

    final = {"index": 0, "content": "", "tokens": [], "id_slot": 0, "stop": True, "model": "m",
             "generation_settings": {"stream": True, "n_predict": 4}, "stop_type": "word",
             "stopping_word": ".", "timings": {}}
    stream = sse(part(" Par", 1), part("is", 2), part("", 3), final)
    _, body = assemble(Plan("native", b"", return_tokens=True), stream)
    assert body["content"] == " Paris" and body["tokens"] == [1, 2, 3]
    assert body["generation_settings"] == {"stream": False, "n_predict": 4}
    assert [p["token"] for p in body["completion_probabilities"]] == [" Par", "is"]
    assert list(body)[:5] == ["index", "content", "tokens", "id_slot", "stop"]
    _, body = assemble(Plan("native", b""), stream)
    assert body["tokens"] == []  # only with return_tokens, as llama-server


def test_anthropic_message_from_its_events() -> None:
    start = {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "m",
        "stop_reason": None, "stop_sequence": None,
        "usage": {"cache_read_input_tokens": 2, "input_tokens": 5, "output_tokens": 0}}}
    events = [
        start,
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "thinking_delta", "thinking": "Hm."}},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_start", "index": 2,
         "content_block": {"type": "tool_use", "id": "t1", "name": "get_weather"}},
        {"type": "content_block_delta", "index": 2,
         "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}},
        {"type": "content_block_delta", "index": 2,
         "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "signature_delta", "signature": ""}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 7}},
        {"type": "message_stop"},
    ]
    status, body = assemble(Plan("messages", b""), sse(*events, named=True))
    assert status == 200
    assert list(body) == ["id", "type", "role", "content", "model", "stop_reason",
                          "stop_sequence", "usage"]
    assert body["content"] == [
        {"type": "thinking", "thinking": "Hm.", "signature": ""},
        {"type": "text", "text": "Hi"},
        {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}]
    assert body["stop_reason"] == "tool_use"
    assert body["usage"] == {"cache_read_input_tokens": 2, "input_tokens": 5, "output_tokens": 7}


def test_responses_take_the_completed_response_in_the_non_streamed_form() -> None:
    response = {"id": "resp_1", "object": "response", "created_at": 9, "status": "completed",
                "model": "m", "output": [
                    {"type": "message", "status": "completed", "id": "msg_1", "role": "assistant",
                     "content": [{"type": "output_text", "text": "Paris"}]},
                    {"id": "rs_1", "type": "reasoning", "summary": []}],
                "usage": {"input_tokens": 3, "output_tokens": 1}}
    events = [{"type": "response.created", "response": {"id": "resp_1"}},
              {"type": "response.output_text.delta", "delta": "Paris"},
              {"type": "response.completed", "response": response}]
    _, body = assemble(Plan("responses", b""), sse(*events, named=True))
    assert list(body) == ["completed_at", "created_at", "id", "model", "object", "output",
                          "status", "usage"]
    assert body["completed_at"] == 9
    assert list(body["output"][0]) == ["content", "id", "role", "status", "type"]
    assert body["output"][1]["status"] == "completed"


@pytest.mark.parametrize(("kind", "stream", "status"), [
    ("chat", sse({"error": {"code": 500, "message": "boom", "type": "server_error"}}), 500),
    ("responses", sse({"error": {"code": 400, "message": "bad", "type": "x"}}), 400),
    ("messages", b"event: error\ndata: {\"code\": 503, \"message\": \"busy\"}\n\n", 503),
    ("native", sse({"error": {"message": "no code"}}), 500),
])
def test_an_error_event_becomes_the_error_answer(kind: Any, stream: bytes, status: int) -> None:
    got, body = assemble(Plan(kind, b""), stream)
    assert got == status and body["error"]["message"]


@pytest.mark.parametrize("kind", ["chat", "completions", "native", "messages", "responses"])
def test_a_stream_cut_before_its_final_event_is_not_an_answer(kind: Any) -> None:
    partial = {"chat": chunk({"content": "Par"}),
               "completions": {"choices": [{"text": "Par", "index": 0, "finish_reason": None}]},
               "native": {"index": 0, "content": "Par", "stop": False},
               "messages": {"type": "message_start", "message": {"id": "m"}},
               "responses": {"type": "response.created", "response": {}}}[kind]
    with pytest.raises(AssemblyError, match="before its final event"):
        assemble(Plan(kind, b""), sse(partial))
