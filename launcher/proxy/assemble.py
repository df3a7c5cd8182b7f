"""Non-streamed generations asked of llama-server as streams, and the answer put back together.

Why: llama-server notices that the client of a non-streamed request went away only when its
wait for a result times out (1 s) with no result for *any* request in between; while another
slot generates, or anything polls `/slots`, that never happens, and an abandoned request keeps
its slot until `max_tokens`. A streamed request writes every token to its socket, so the close
lalo makes when its client leaves stops the generation at the next token. So lalo asks for a
stream, reads it whole, and answers the client with the JSON llama-server would have sent for
the non-streamed request: the same fields in the same order, made from the events the way the
SDKs accumulate streams.

lalo's own engine carries patch 0004, which makes that wait end on time whatever else the
server does: its requests go as they came (a stream costs a server on 2 CPUs 4-9 % of its
decode speed), and this module serves llama-servers lalo did not build (`assembles` in the
model's `SupervisedModel`).

Requests this module does not know how to put back together (other routes, `response_fields`
on the native routes) are sent as they came.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal

Kind = Literal["chat", "completions", "native", "messages", "responses"]

# path -> how its stream is put back together; llama-server's paths (tools/server/server.cpp)
ASSEMBLED_PATHS: Final[dict[str, Kind]] = {
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/completions": "completions",
    "/completion": "native",
    "/completions": "native",
    "/infill": "native",
    "/v1/messages": "messages",
    "/v1/responses": "responses",
    "/responses": "responses",
}


@dataclass(frozen=True)
class Plan:
    """A non-streamed request to be sent as a stream: how to assemble it, and the body to send."""

    kind: Kind
    body: bytes
    return_tokens: bool = False  # native routes: the final object lists the tokens only if asked
    verbose: bool = False  # the client asked for llama-server's `__verbose` itself


def plan(path: str, payload: dict[str, Any]) -> Plan | None:
    """The streamed form of a non-streamed generation request, or None to send it as it is."""
    kind = ASSEMBLED_PATHS.get(path)
    if kind is None or payload.get("stream") is True:
        return None
    if kind == "native" and "response_fields" in payload:
        return None  # llama-server filters only its final object by them: send as it came
    body = {**payload, "stream": True}
    if kind == "chat":
        body["stream_options"] = {"include_usage": True}  # the usage of the whole answer
    else:
        body.pop("stream_options", None)
    verbose = payload.get("verbose") is True
    if kind == "completions" and payload.get("logprobs") and payload.get("stop"):
        # whether a stop word ended the text (its tokens' logprobs are then left out) is
        # written only in llama-server's own `__verbose` part of the last event
        body["verbose"] = True
    return Plan(kind, json.dumps(body, ensure_ascii=False).encode(),
                return_tokens=payload.get("return_tokens") is True, verbose=verbose)


class AssemblyError(Exception):
    """The stream cannot be made into an answer (cut short, or not what the route sends)."""


class EventReader:
    """Server-sent events from the bytes of a stream: (event name, parsed `data`)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> Iterator[tuple[str, Any]]:
        # the whole buffer: a CR and its LF may come in different chunks
        self._buffer = (self._buffer + chunk).replace(b"\r\n", b"\n")
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return
            block, self._buffer = self._buffer[:end], self._buffer[end + 2:]
            name = ""
            data: list[bytes] = []
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    data.append(line[5:].strip())
                elif line.startswith(b"event:"):
                    name = line[6:].strip().decode("utf-8", "replace")
                # comments (": ping") and other fields are not part of the answer
            text = b"\n".join(data)
            if not text or text == b"[DONE]":
                continue
            try:
                yield name, json.loads(text)
            except ValueError as exc:
                raise AssemblyError(f"the model server sent an event that is not JSON: "
                                    f"{text[:200]!r}") from exc


@dataclass
class Answer:
    """What the client gets: a status and a JSON body."""

    status: int
    body: Any

    def encode(self) -> bytes:
        return json.dumps(self.body, ensure_ascii=False, separators=(",", ":")).encode()


class Assembler:
    """Events in, the non-streamed answer out. One per request."""

    def __init__(self) -> None:
        self.error: Any = None
        self.finished = False

    def feed(self, event: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise AssemblyError(f"the model server sent an event that is not an object: {data!r}")
        if event == "error" or set(data) == {"error"}:  # Anthropic's error event, or OpenAI's
            self.error = data.get("error", data)
            return
        self.take(data)

    def take(self, data: dict[str, Any]) -> None:
        raise NotImplementedError

    def result(self) -> Any:
        raise NotImplementedError

    def answer(self) -> Answer:
        if self.error is not None:
            error = self.error if isinstance(self.error, dict) else {"message": str(self.error)}
            code = error.get("code")
            status = code if isinstance(code, int) and 400 <= code <= 599 else 500
            return Answer(status, {"error": error})
        if not self.finished:
            raise AssemblyError("the model server's stream ended before its final event")
        return Answer(200, self.result())


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _without_stop_word(probs: list[Any], text: str) -> list[Any]:
    """Token probabilities less those of a stop word that ended the text.

    A stream sends the probabilities of the tokens that made the stop word (with their text
    cut, so often empty), which a non-streamed answer drops. Dropped here: the trailing
    tokens without text, then those whose bytes go beyond the text's.
    """
    def size(entry: Any) -> int:
        return len(entry.get("bytes") or ()) if isinstance(entry, dict) else 0

    kept = list(probs)
    while kept and size(kept[-1]) == 0:
        kept.pop()
    limit = len(text.encode())
    total = sum(map(size, kept))
    while kept and total > limit:
        total -= size(kept.pop())
    return kept


@dataclass
class _ToolCall:
    id: str = ""
    name: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)


@dataclass
class _Choice:
    role: str = "assistant"
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tools: dict[int, _ToolCall] = field(default_factory=dict)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: Any = None


class _OpenAI(Assembler):
    """Chunks of `/v1/chat/completions` or `/v1/completions`: choices by index, usage, timings."""

    def __init__(self, chat: bool, verbose: bool = False) -> None:
        super().__init__()
        self.chat = chat
        self.verbose = verbose
        self.last_verbose: Any = None  # llama-server's `__verbose` of the last event
        self.head: dict[str, Any] = {}
        self.choices: dict[int, _Choice] = {}
        self.usage: Any = None
        self.timings: Any = None

    def take(self, data: dict[str, Any]) -> None:
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in data:
                self.head[key] = data[key]
        if data.get("usage") is not None:
            self.usage = data["usage"]
        if "timings" in data:
            self.timings = data["timings"]
        if "__verbose" in data:
            self.last_verbose = data["__verbose"]
        for raw in data.get("choices") or ():
            if not isinstance(raw, dict):
                continue
            index = raw.get("index", 0)
            choice = self.choices.setdefault(index if isinstance(index, int) else 0, _Choice())
            if self.chat:
                self._delta(choice, raw.get("delta") or {})
            else:
                choice.content.append(_text(raw.get("text")))
            logprobs = raw.get("logprobs")
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                choice.logprobs.extend(logprobs["content"])
            if raw.get("finish_reason") is not None:
                choice.finish_reason = raw["finish_reason"]
                self.finished = True

    @staticmethod
    def _delta(choice: _Choice, delta: dict[str, Any]) -> None:
        if isinstance(delta.get("role"), str):
            choice.role = delta["role"]
        choice.content.append(_text(delta.get("content")))
        choice.reasoning.append(_text(delta.get("reasoning_content")))
        for raw in delta.get("tool_calls") or ():
            index = raw.get("index", 0) if isinstance(raw, dict) else 0
            call = choice.tools.setdefault(index, _ToolCall())
            if raw.get("id"):
                call.id = raw["id"]
            function = raw.get("function") or {}
            call.name.append(_text(function.get("name")))
            call.arguments.append(_text(function.get("arguments")))

    def result(self) -> Any:
        # keys in the order llama-server writes them (its JSON objects keep insertion order)
        choices = []
        for index in sorted(self.choices):
            choice = self.choices[index]
            out: dict[str, Any]
            if self.chat:
                out = {"finish_reason": choice.finish_reason, "index": index,
                       "message": self._message(choice)}
                if choice.logprobs:
                    out["logprobs"] = {"content": choice.logprobs}
            else:
                text = "".join(choice.content)
                stopped_by_word = (isinstance(self.last_verbose, dict)
                                   and self.last_verbose.get("stop_type") == "word")
                probs = (_without_stop_word(choice.logprobs, text)
                         if stopped_by_word else choice.logprobs)
                out = {"text": text, "index": index,
                       "logprobs": {"content": probs} if choice.logprobs else None,
                       "finish_reason": choice.finish_reason}
            choices.append(out)
        head = self.head
        body: dict[str, Any] = {
            "choices": choices, "created": head.get("created"), "model": head.get("model"),
            "system_fingerprint": head.get("system_fingerprint"),
            "object": "chat.completion" if self.chat else "text_completion"}
        if self.usage is not None:
            body["usage"] = self.usage
        body["id"] = head.get("id")
        if self.verbose and self.last_verbose is not None:
            body["__verbose"] = self.last_verbose
        if self.timings is not None:
            body["timings"] = self.timings
        return body

    @staticmethod
    def _message(choice: _Choice) -> dict[str, Any]:
        message: dict[str, Any] = {"role": choice.role, "content": "".join(choice.content)}
        reasoning = "".join(choice.reasoning)
        if reasoning:
            message["reasoning_content"] = reasoning
        if choice.tools:
            calls = []
            for index in sorted(choice.tools):
                call = choice.tools[index]
                out: dict[str, Any] = {"type": "function", "function": {
                    "name": "".join(call.name), "arguments": "".join(call.arguments)}}
                if call.id:
                    out["id"] = call.id
                calls.append(out)
            message["tool_calls"] = calls
        return message


class _Native(Assembler):
    """llama-server's own `/completion` and `/infill`: partial objects, then the final one."""

    def __init__(self, return_tokens: bool) -> None:
        super().__init__()
        self.return_tokens = return_tokens
        self.content: dict[int, list[str]] = {}
        self.tokens: dict[int, list[Any]] = {}
        self.probs: dict[int, list[Any]] = {}
        self.final: dict[int, dict[str, Any]] = {}

    def take(self, data: dict[str, Any]) -> None:
        index = data.get("index", 0)
        index = index if isinstance(index, int) else 0
        self.content.setdefault(index, []).append(_text(data.get("content")))
        tokens = data.get("tokens")
        if isinstance(tokens, list):
            self.tokens.setdefault(index, []).extend(tokens)
        probs = data.get("completion_probabilities")
        if isinstance(probs, list):
            self.probs.setdefault(index, []).extend(probs)
        if data.get("stop") is True:
            self.final[index] = data
            self.finished = len(self.final) >= len(self.content)

    def result(self) -> Any:
        answers = []
        for index in sorted(self.final):
            answer = dict(self.final[index])
            answer["content"] = "".join(self.content.get(index, []))
            answer["tokens"] = self.tokens.get(index, []) if self.return_tokens else []
            probs = self.probs.get(index)
            if probs:
                answer["completion_probabilities"] = (
                    _without_stop_word(probs, answer["content"])
                    if answer.get("stop_type") == "word" else probs)
            settings = answer.get("generation_settings")
            if isinstance(settings, dict) and "stream" in settings:
                answer["generation_settings"] = {**settings, "stream": False}
            answers.append(answer)
        return answers[0] if len(answers) == 1 else answers


class _Messages(Assembler):
    """Anthropic's `/v1/messages` events: the message, its content blocks by index, the end."""

    def __init__(self) -> None:
        super().__init__()
        self.message: dict[str, Any] = {"id": None, "type": "message", "role": "assistant",
                                        "content": [], "model": None, "stop_reason": None,
                                        "stop_sequence": None}
        self.blocks: dict[int, dict[str, Any]] = {}
        self.json_parts: dict[int, list[str]] = {}

    def take(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "message_start" and isinstance(data.get("message"), dict):
            self.message.update(data["message"])
        elif kind == "content_block_start":
            block = data.get("content_block")
            self.blocks[data.get("index", 0)] = dict(block) if isinstance(block, dict) else {}
        elif kind == "content_block_delta":
            index = data.get("index", 0)
            block = self.blocks.setdefault(index, {})
            delta = data.get("delta") or {}
            kind = delta.get("type")
            if kind == "text_delta":
                block["text"] = _text(block.get("text")) + _text(delta.get("text"))
            elif kind == "thinking_delta":
                block["thinking"] = _text(block.get("thinking")) + _text(delta.get("thinking"))
            elif kind == "signature_delta":
                block["signature"] = _text(block.get("signature")) + _text(delta.get("signature"))
            elif kind == "input_json_delta":
                self.json_parts.setdefault(index, []).append(_text(delta.get("partial_json")))
        elif kind == "message_delta":
            delta = data.get("delta") or {}
            for key in ("stop_reason", "stop_sequence"):
                if key in delta:
                    self.message[key] = delta[key]
            if isinstance(data.get("usage"), dict):
                usage = self.message.get("usage")
                self.message["usage"] = {**(usage if isinstance(usage, dict) else {}),
                                         **data["usage"]}
        elif kind == "message_stop":
            self.finished = True

    def result(self) -> Any:
        content = []
        for index in sorted(self.blocks):
            block = self.blocks[index]
            if block.get("type") == "tool_use":
                try:  # as llama-server does: arguments that are not JSON become {}
                    block["input"] = json.loads("".join(self.json_parts.get(index, [])) or "{}")
                except ValueError:
                    block["input"] = {}
            content.append(block)
        return {**self.message, "content": content}


class _Responses(Assembler):
    """OpenAI's `/v1/responses` events: `response.completed` carries the whole response."""

    def __init__(self) -> None:
        super().__init__()
        self.response: dict[str, Any] = {}

    def take(self, data: dict[str, Any]) -> None:
        if data.get("type") == "response.completed" and isinstance(data.get("response"), dict):
            self.response = data["response"]
            self.finished = True

    def result(self) -> Any:
        # the non-streamed response's keys, order and `completed_at`; its output items as the
        # non-streamed one writes them (a message's keys sorted, reasoning with its status)
        response = self.response
        created = response.get("created_at")
        out: dict[str, Any] = {"completed_at": created, "created_at": created}
        for key in ("id", "model", "object"):
            out[key] = response.get(key)
        out["output"] = [self._item(item) for item in response.get("output") or []]
        out["status"] = response.get("status")
        out.update((k, v) for k, v in response.items() if k not in out)
        return out

    @staticmethod
    def _item(item: Any) -> Any:
        if not isinstance(item, dict):
            return item
        if item.get("type") == "message":
            return dict(sorted(item.items()))
        if item.get("type") == "reasoning":
            return {**item, "status": item.get("status", "completed")}
        return item


def assembler(plan: Plan) -> Assembler:
    kind = plan.kind
    if kind == "chat":
        return _OpenAI(chat=True, verbose=plan.verbose)
    if kind == "completions":
        return _OpenAI(chat=False, verbose=plan.verbose)
    if kind == "native":
        return _Native(plan.return_tokens)
    if kind == "messages":
        return _Messages()
    return _Responses()
