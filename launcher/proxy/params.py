"""A model's request rules (lalo.yaml `defaults`, `set`, `limits`, `strip`) applied to the body
the forwarder sends to its server: pure functions, one place for every API.

Bodies arrive here as llama-server takes them: OpenAI's and llama.cpp's own routes as sent,
Ollama's translated to OpenAI's (`options.num_predict` is `max_tokens` by now), Anthropic's
and Responses' as sent (llama-server converts those itself). So each parameter has, per body
shape, the names llama-server reads it from (in the order it prefers them) and the one lalo
writes. Anthropic Messages carries only `max_tokens`, `temperature`, `top_p`, `top_k` and
`stop_sequences` (llama-server drops the rest), so only those are ruled there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from launcher.config.request_params import ParamName, RequestRules

Shape = Literal["openai", "native", "responses", "anthropic"]
Changes = dict[str, list[Any]]  # parameter -> [what the caller sent, what is sent]; None: absent

# the generation routes (llama-server's paths) and the shape of their bodies
GENERATION_PATHS: Final[dict[str, Shape]] = {
    "/v1/chat/completions": "openai",
    "/chat/completions": "openai",
    "/v1/completions": "openai",
    "/completion": "native",
    "/completions": "native",
    "/infill": "native",
    "/v1/responses": "responses",
    "/responses": "responses",
    "/v1/messages": "anthropic",
}
PARAMS: Final[tuple[str, ...]] = get_args(ParamName)
# llama-server's n_predict and its aliases, in the order it reads them (server-schema.cpp)
_LENGTH = ("n_predict", "max_completion_tokens", "max_tokens")
_ANTHROPIC = frozenset({"max_tokens", "temperature", "top_p", "top_k"})


@dataclass(frozen=True)
class Wire:
    """Where one parameter is in a body: the name lalo writes, and every name the server reads
    it from, the one it prefers first."""

    write: str
    read: tuple[str, ...]


def wire(param: str, shape: Shape) -> Wire | None:
    """The names of `param` in a body of `shape`; None when that API does not carry it."""
    if shape == "anthropic":
        if param == "stop":
            return Wire("stop_sequences", ("stop_sequences",))
        return Wire(param, (param,)) if param in _ANTHROPIC else None
    if param != "max_tokens":
        return Wire(param, (param,))
    if shape == "native":
        return Wire("n_predict", _LENGTH)
    if shape == "responses":  # llama-server turns max_output_tokens into max_tokens
        return Wire("max_output_tokens", (*_LENGTH[:2], "max_output_tokens", "max_tokens"))
    return Wire("max_tokens", _LENGTH)


def apply_rules(body: dict[str, Any], rules: RequestRules,
                shape: Shape = "openai") -> tuple[dict[str, Any], Changes]:
    """`body` with the rules applied (a copy; `body` itself when nothing changed) and what
    changed. Per parameter: strip removes it; else `set` replaces it; else a default fills it
    when absent, then `limits` bound it (see `_bounded`)."""
    result = body
    changes: Changes = {}
    for param in PARAMS:
        if not _ruled(param, rules):
            continue
        names = wire(param, shape)
        if names is None:
            continue
        before = next((body[name] for name in names.read if body.get(name) is not None), None)
        after = _decide(param, before, rules)
        if _same(before, after):
            continue
        if result is body:
            result = dict(body)
        for name in names.read:  # one name left, so the server cannot read another
            result.pop(name, None)
        if after is not None:
            result[names.write] = after
        changes[param] = [before, after]
    return result, changes


def apply_to_request(path: str, body: bytes, rules: RequestRules) -> tuple[bytes, Changes]:
    """The request body for `path` with the rules applied, and what changed. Routes that do
    not generate, and bodies that are not a JSON object, pass unchanged."""
    shape = GENERATION_PATHS.get(path)
    if shape is None or not rules:
        return body, {}
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return body, {}  # the server says what is wrong with it
    if not isinstance(payload, dict):
        return body, {}
    result, changes = apply_rules(payload, rules, shape)
    if not changes:
        return body, {}
    return json.dumps(result, ensure_ascii=False).encode(), changes


def _ruled(param: str, rules: RequestRules) -> bool:
    return (param in rules.strip or param in rules.set or param in rules.defaults
            or param in rules.limits)


def _decide(param: str, value: Any, rules: RequestRules) -> Any:
    """What is sent for `param` when the caller sent `value` (None: absent)."""
    if param in rules.strip:
        return None
    if param in rules.set:
        return rules.set[param]
    if value is None:
        value = rules.defaults.get(param)
    if param in rules.limits:
        low, high = rules.limits[param]
        value = _bounded(param, value, low, high)
    return value


def _bounded(param: str, value: Any, low: float | None, high: float | None) -> Any:
    """`value` within [low, high]. A value that is not a number counts as absent (llama-server
    would use its default for it, so it is dropped). An absent `max_tokens`, or a negative one
    (no limit), becomes the max: a cap holds whatever the caller sends or leaves out. Other
    absent parameters stay absent: the server's own default (or `defaults`) applies."""
    if not _is_number(value) or (param == "max_tokens" and value < 0):
        return high if param == "max_tokens" else None
    if low is not None and value < low:
        return low
    if high is not None and value > high:
        return high
    return value


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _same(before: Any, after: Any) -> bool:
    # 1 == True in Python: a boolean sent for a number is a change
    return before == after and isinstance(before, bool) == isinstance(after, bool)
