"""Ollama's answers from llama-server's: whole JSON answers, and server-sent events turned into
NDJSON lines as they stream (each piece, then a last line with `done` and the counters).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Message, Send

from launcher.proxy.errors import error_message
from launcher.proxy.ollama_convert import counters, done_reason, ollama_tool_calls, timestamp


@dataclass
class CapturedAnswer:
    """An answer the Forwarder sent, held instead of going to the client."""

    status: int = 0
    content_type: bytes = b""
    body: list[bytes] = field(default_factory=list)

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.content_type = _content_type(message)
        elif message["type"] == "http.response.body":
            self.body.append(message.get("body", b""))

    def json(self) -> Any:
        return json.loads(b"".join(self.body))


def whole_answer(result: dict[str, Any], requested: str, chat: bool, begun: float,
                  load_seconds: float) -> dict[str, Any]:
    choice = (result.get("choices") or [{}])[0]
    answer: dict[str, Any] = {"model": requested, "created_at": timestamp()}
    if chat:
        message = choice.get("message") or {}
        out: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
        if message.get("reasoning_content"):
            out["thinking"] = message["reasoning_content"]
        if message.get("tool_calls"):
            out["tool_calls"] = ollama_tool_calls(message["tool_calls"])
        answer["message"] = out
    else:
        message = choice.get("message")
        answer["response"] = (message or {}).get("content") or choice.get("text") or ""
    answer["done"] = True
    answer["done_reason"] = done_reason(choice.get("finish_reason"))
    answer.update(counters(result.get("usage"), result.get("timings"),
                           time.perf_counter() - begun, load_seconds))
    return answer


class StreamTranslator:
    """A `send` for the Forwarder: OpenAI server-sent events in, Ollama NDJSON lines out."""

    def __init__(self, send: Send, model: str, chat: bool, begun: float, load_seconds: float) -> None:
        self._send = send
        self.model = model
        self.chat = chat
        self.begun = begun
        self.load_seconds = load_seconds
        self.status = 0
        self.streaming = False
        self.pending = b""
        self.error_body: list[bytes] = []
        self.finish_reason: Any = None
        self.usage: Any = None
        self.timings: Any = None
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finished = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            content_type = _content_type(message)
            self.streaming = self.status == 200 and content_type.startswith(b"text/event-stream")
            if self.streaming:
                await self._send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no")]})
            return
        if message["type"] != "http.response.body":
            return
        more = message.get("more_body", False)
        if not self.streaming:
            self.error_body.append(message.get("body", b""))
            if not more:
                status = self.status if self.status >= 400 else 502
                await send_json(self._send, status, {"error": error_message(b"".join(self.error_body))})
            return
        self.pending += message.get("body", b"")
        lines = self.pending.split(b"\n")
        self.pending = lines.pop()
        out = b"".join([self._event(line) for line in lines])
        if not more and not self.finished:
            out += self._final()
        if out or not more:
            await self._send({"type": "http.response.body", "body": out, "more_body": more})

    def _event(self, line: bytes) -> bytes:
        line = line.strip()
        if not line.startswith(b"data:") or self.finished:
            return b""
        data = line[5:].strip()
        if data == b"[DONE]":
            return self._final()
        try:
            event = json.loads(data)
        except ValueError:
            return b""
        if isinstance(event.get("error"), dict | str):
            self.finished = True
            return _line({"error": error_message(data)})
        if event.get("usage"):
            self.usage = event["usage"]
        if event.get("timings"):
            self.timings = event["timings"]
        out = b""
        for choice in event.get("choices") or []:
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            if not self.chat or "text" in choice:
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if text:
                    out += self._chunk(content=text)
                continue
            delta = choice.get("delta") or {}
            for call in delta.get("tool_calls") or []:
                self._add_tool_call(call)
            if delta.get("content") or delta.get("reasoning_content"):
                out += self._chunk(content=delta.get("content") or "",
                                   thinking=delta.get("reasoning_content"))
        return out

    def _add_tool_call(self, call: dict[str, Any]) -> None:
        entry = self.tool_calls.setdefault(int(call.get("index", len(self.tool_calls))),
                                           {"id": "", "function": {"name": "", "arguments": ""}})
        if call.get("id"):
            entry["id"] = call["id"]
        function = call.get("function") or {}
        entry["function"]["name"] += function.get("name") or ""
        entry["function"]["arguments"] += function.get("arguments") or ""

    def _chunk(self, content: str, thinking: str | None = None,
               tool_calls: list[dict[str, Any]] | None = None) -> bytes:
        answer: dict[str, Any] = {"model": self.model, "created_at": timestamp()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            answer["message"] = message
        else:
            answer["response"] = content
        answer["done"] = False
        return _line(answer)

    def _final(self) -> bytes:
        self.finished = True
        out = b""
        if self.tool_calls:
            calls = [self.tool_calls[index] for index in sorted(self.tool_calls)]
            out += self._chunk(content="", tool_calls=ollama_tool_calls(calls))
        answer: dict[str, Any] = {"model": self.model, "created_at": timestamp()}
        if self.chat:
            answer["message"] = {"role": "assistant", "content": ""}
        else:
            answer["response"] = ""
        answer["done"] = True
        answer["done_reason"] = done_reason(self.finish_reason)
        answer.update(counters(self.usage, self.timings, time.perf_counter() - self.begun,
                               self.load_seconds))
        return out + _line(answer)


def _content_type(start: Message) -> bytes:
    for key, value in start.get("headers", []):
        if key.lower() == b"content-type":
            return bytes(value)
    return b""


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


async def send_json(send: Send, status: int, data: dict[str, Any]) -> None:
    body = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json; charset=utf-8"),
        (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
