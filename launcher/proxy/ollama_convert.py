"""Ollama's request and answer shapes to llama-server's OpenAI-compatible ones and back: pure functions.

Field meanings follow Ollama's docs/api.md: durations in answers are nanoseconds, `options`
holds the sampling parameters, `format` is "json" or a JSON schema, `keep_alive` a Go
duration string ("5m", "1h30m") or a number of seconds.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any, Final


class OllamaRequestError(ValueError):
    """A request lalo cannot translate; the message names the field."""


# Ollama option -> llama-server field of the same meaning
OPTION_FIELDS: Final[dict[str, str]] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "mirostat": "mirostat",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
    "num_keep": "n_keep",
}
# Ollama options that set up the runner, not a request: lalo.yaml decides these per model
# (num_ctx is the model's ctx_size, num_thread its threads); accepted and ignored.
IGNORED_OPTIONS: Final[frozenset[str]] = frozenset({
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
    "vocab_only", "use_mmap", "use_mlock", "num_thread", "numa", "embedding_only",
    "penalize_newline", "tfs_z",
})

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS: Final[dict[str, float]] = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}


def parse_keep_alive(value: Any) -> float | None:
    """Seconds from a `keep_alive` value; None when absent; negative means forever."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise OllamaRequestError(f"keep_alive: expected a duration or seconds, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise OllamaRequestError(f"keep_alive: expected a duration or seconds, got {value!r}")
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(body):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if not body or position != len(body):
        raise OllamaRequestError(
            f"keep_alive: {value!r} is not a duration (e.g. \"5m\", \"1h30m\", \"0\", or seconds)")
    return sign * total


def sampling_fields(options: Any) -> dict[str, Any]:
    """llama-server request fields for Ollama's `options`."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise OllamaRequestError(f"options: expected an object, got {type(options).__name__}")
    fields: dict[str, Any] = {}
    for key, value in options.items():
        if key in OPTION_FIELDS:
            fields[OPTION_FIELDS[key]] = value
        elif key == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool):
                raise OllamaRequestError(f"options.num_predict: expected an integer, got {value!r}")
            if value >= 0:  # -1: until the end of the context, -2: fill it (the default)
                fields["max_tokens"] = value
        elif key not in IGNORED_OPTIONS:
            raise OllamaRequestError(
                f"options.{key}: unknown option (known: "
                f"{', '.join(sorted([*OPTION_FIELDS, 'num_predict', *IGNORED_OPTIONS]))})")
    return fields


def response_format(value: Any) -> dict[str, Any] | None:
    """OpenAI `response_format` for Ollama's `format`: "json" or a JSON schema object."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise OllamaRequestError(f"format: expected \"json\" or a JSON schema object, got {value!r}")


def openai_messages(messages: Any) -> list[dict[str, Any]]:
    """Ollama chat messages (images as base64, tool call arguments as objects) in OpenAI's shape."""
    if not isinstance(messages, list):
        raise OllamaRequestError("messages: expected a list")
    converted = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise OllamaRequestError(f"messages[{index}]: expected an object with a 'role'")
        out: dict[str, Any] = {"role": message["role"]}
        content = message.get("content") or ""
        images = message.get("images") or []
        if images:
            out["content"] = [{"type": "text", "text": content}] + [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}
                for image in images
            ]
        else:
            out["content"] = content
        if message.get("thinking"):
            out["reasoning_content"] = message["thinking"]
        calls = message.get("tool_calls")
        if calls:
            out["tool_calls"] = [_openai_tool_call(call, index, n) for n, call in enumerate(calls)]
        if message.get("tool_name"):
            out["name"] = message["tool_name"]
        if message.get("tool_call_id"):
            out["tool_call_id"] = message["tool_call_id"]
        converted.append(out)
    return converted


def _openai_tool_call(call: Any, message: int, number: int) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise OllamaRequestError(
            f"messages[{message}].tool_calls[{number}]: expected {{'function': {{'name', 'arguments'}}}}")
    arguments = function.get("arguments", {})
    return {
        "id": call.get("id") or f"call_{message}_{number}",
        "type": "function",
        "function": {"name": function["name"],
                     "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)},
    }


def ollama_tool_calls(calls: Any) -> list[dict[str, Any]]:
    """OpenAI tool calls (arguments a JSON string) as Ollama's (arguments an object)."""
    result = []
    for call in calls or []:
        function = call.get("function") or {}
        arguments = function.get("arguments") or "{}"
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            parsed = {"_raw": arguments}
        entry: dict[str, Any] = {"function": {"name": function.get("name", ""), "arguments": parsed}}
        if call.get("id"):
            entry["id"] = call["id"]
        result.append(entry)
    return result


def done_reason(finish_reason: Any) -> str:
    """Ollama's `done_reason` for an OpenAI `finish_reason`."""
    if finish_reason == "length":
        return "length"
    return "stop"


def counters(usage: Any, timings: Any, total_seconds: float, load_seconds: float) -> dict[str, int]:
    """The final answer's statistics, in nanoseconds and tokens."""
    usage = usage if isinstance(usage, dict) else {}
    timings = timings if isinstance(timings, dict) else {}
    prompt = timings.get("prompt_n", usage.get("prompt_tokens", 0))
    generated = timings.get("predicted_n", usage.get("completion_tokens", 0))
    return {
        "total_duration": int(total_seconds * 1e9),
        "load_duration": int(load_seconds * 1e9),
        "prompt_eval_count": int(prompt or 0),
        "prompt_eval_duration": int(float(timings.get("prompt_ms", 0) or 0) * 1e6),
        "eval_count": int(generated or 0),
        "eval_duration": int(float(timings.get("predicted_ms", 0) or 0) * 1e6),
    }


def timestamp(at: float | None = None) -> str:
    """RFC 3339 with nanosecond-style fraction and Z, as Ollama writes `created_at`."""
    moment = datetime.fromtimestamp(at, UTC) if at is not None else datetime.now(UTC)
    return moment.isoformat().replace("+00:00", "Z")
