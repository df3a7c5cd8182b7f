"""A model's request rules: lalo.yaml's `defaults`, `set`, `limits` and `strip` validated, and
applied to the bodies of every API (launcher.proxy.params)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from launcher.config import ActivityConfig, parse_config
from launcher.config.request_params import RequestRules
from launcher.errors import ConfigError
from launcher.proxy.activity import Activity
from launcher.proxy.ollama_convert import sampling_fields
from launcher.proxy.params import apply_rules, apply_to_request

MODEL = "models:\n  m:\n    file: m.gguf\n"


def rules_of(yaml: str) -> RequestRules:
    return parse_config(MODEL + yaml, label="lalo.yaml").models["m"].request_rules


def rules(**kwargs: Any) -> RequestRules:
    return RequestRules(defaults=kwargs.get("defaults", {}), set=kwargs.get("set", {}),
                        limits=kwargs.get("limits", {}), strip=frozenset(kwargs.get("strip", ())))


# --- config -------------------------------------------------------------------------------------
def test_config_shape() -> None:
    parsed = rules_of(
        "    defaults: {temperature: 0.2, top_p: 0.9}\n"
        "    set: {seed: 7, stop: ['</s>']}\n"
        "    limits:\n"
        "      max_tokens: 512\n"
        "      temperature: {min: 0, max: 1}\n"
        "      top_k: {min: 1}\n"
        "    strip: [mirostat]\n")
    assert parsed == RequestRules(
        defaults={"temperature": 0.2, "top_p": 0.9}, set={"seed": 7, "stop": ["</s>"]},
        limits={"max_tokens": (None, 512), "temperature": (0.0, 1.0), "top_k": (1, None)},
        strip=frozenset({"mirostat"}))
    assert not rules_of("")  # no rules: the proxy leaves the model's requests alone


KNOWN = ("max_tokens, temperature, top_p, top_k, min_p, typical_p, repeat_penalty, "
         "repeat_last_n, presence_penalty, frequency_penalty, dry_multiplier, xtc_probability, "
         "xtc_threshold, mirostat, mirostat_tau, mirostat_eta, seed, stop")


@pytest.mark.parametrize(("yaml", "message"), [
    ("    defaults: {temp: 0}\n",
     f"lalo.yaml:4: models.m.defaults.temp: unknown key (known keys: {KNOWN})"),
    ("    set: {max_token: 5}\n", "lalo.yaml:4: models.m.set.max_token: unknown key (known keys: "),
    ("    limits: {seed: 5}\n", "lalo.yaml:4: models.m.limits.seed: unknown key (known keys: "
                                "max_tokens, temperature,"),
    ("    strip: [logit_bias]\n", "lalo.yaml:4: models.m.strip.0: must be one of 'max_tokens', "),
    ("    set: {top_p: 2}\n", "lalo.yaml:4: models.m.set.top_p: must be <= 1.0, got 2"),
    ("    set: {max_tokens: 1.5}\n",
     "lalo.yaml:4: models.m.set.max_tokens: must be an integer, got 1.5"),
    ("    defaults: {temperature: hot}\n",
     "lalo.yaml:4: models.m.defaults.temperature: must be a number, got 'hot'"),
    ("    limits: {max_tokens: 5.5}\n",
     "lalo.yaml:4: models.m.limits.max_tokens: must be whole numbers, got max 5.5"),
    ("    limits: {temperature: {min: 2, max: 1}}\n",
     "lalo.yaml:4: models.m.limits.temperature: min 2 is above max 1"),
    ("    limits: {temperature: {}}\n",
     "lalo.yaml:4: models.m.limits.temperature: give min, max or both (or just a number: the max)"),
    ("    limits: {temperature: [0, 1]}\n",
     "lalo.yaml:4: models.m.limits.temperature: must be a number (the max) or {min: A, max: B}, "
     "got [0, 1]"),
    ("    strip: [seed]\n    set: {seed: 1}\n",
     "lalo.yaml:2: models.m: strip removes seed, which set.seed gives: keep one"),
    ("    defaults: {temperature: 2}\n    limits: {temperature: 1}\n",
     "lalo.yaml:2: models.m: defaults.temperature: 2 is outside limits.temperature (max 1)"),
    ("    set: {max_tokens: 9000}\n    limits: {max_tokens: 512}\n",
     "lalo.yaml:2: models.m: set.max_tokens: 9000 is outside limits.max_tokens (max 512)"),
])
def test_config_errors_name_the_path(yaml: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(MODEL + yaml, label="lalo.yaml")
    assert str(caught.value).startswith(message)


# --- each rule ----------------------------------------------------------------------------------
def test_nothing_changes_without_rules_or_matching_parameters() -> None:
    body = {"model": "m", "messages": [], "temperature": 0.7}
    assert apply_rules(body, rules()) == (body, {})
    assert apply_rules(body, rules(defaults={"temperature": 0.1}))[0] is body
    assert apply_rules(body, rules(limits={"temperature": (0.0, 1.0)})) == (body, {})
    raw = json.dumps(body).encode()
    assert apply_to_request("/v1/chat/completions", raw, rules()) == (raw, {})


def test_defaults_fill_only_what_is_absent() -> None:
    rule = rules(defaults={"temperature": 0.0, "top_k": 20})
    body, changes = apply_rules({"temperature": 0.9}, rule)
    assert body == {"temperature": 0.9, "top_k": 20}
    assert changes == {"top_k": [None, 20]}
    assert apply_rules({"temperature": None}, rule)[0]["temperature"] == 0.0  # null: absent


def test_set_overrides_the_caller() -> None:
    body, changes = apply_rules({"temperature": 1.5, "seed": 3},
                                rules(set={"temperature": 0.0, "stop": ["\n"]}))
    assert body == {"temperature": 0.0, "seed": 3, "stop": ["\n"]}
    assert changes == {"temperature": [1.5, 0.0], "stop": [None, ["\n"]]}


def test_limits_cap_what_is_sent_and_a_missing_length() -> None:
    rule = rules(limits={"max_tokens": (None, 512), "temperature": (0.1, 1.0)})
    body, changes = apply_rules({"max_tokens": 4096, "temperature": 0.0}, rule)
    assert body == {"max_tokens": 512, "temperature": 0.1}
    assert changes == {"temperature": [0.0, 0.1], "max_tokens": [4096, 512]}
    # no max_tokens (or -1, "no limit") would mean the whole context: the cap is sent
    assert apply_rules({}, rule) == ({"max_tokens": 512}, {"max_tokens": [None, 512]})
    assert apply_rules({"max_tokens": -1}, rule)[0] == {"max_tokens": 512}
    # within the limits: untouched; an absent temperature stays the server's default
    assert apply_rules({"max_tokens": 100, "temperature": 0.5}, rule)[1] == {}
    # a value that is not a number (llama-server would fall back to its default) counts as absent
    assert apply_rules({"max_tokens": "9999", "temperature": True}, rule) == (
        {"max_tokens": 512}, {"temperature": [True, None], "max_tokens": ["9999", 512]})


def test_strip_removes_the_parameter_under_every_name() -> None:
    body, changes = apply_rules({"seed": 5, "n_predict": 9, "max_tokens": 7, "top_p": 0.5},
                                rules(strip={"seed", "max_tokens"}))
    assert body == {"top_p": 0.5}
    assert changes == {"max_tokens": [9, None], "seed": [5, None]}


def test_precedence_set_then_limits_then_defaults() -> None:
    rule = rules(defaults={"temperature": 0.5}, limits={"temperature": (None, 1.0)},
                 set={"top_p": 0.8})
    assert apply_rules({"temperature": 1.7, "top_p": 0.1}, rule)[0] == {
        "temperature": 1.0, "top_p": 0.8}  # limits over the caller, set over everything
    assert apply_rules({}, rule)[0] == {"temperature": 0.5, "top_p": 0.8}
    both = rules(set={"max_tokens": 64}, limits={"max_tokens": (None, 512)})
    assert apply_rules({"max_tokens": 1000}, both)[0] == {"max_tokens": 64}


# --- each API's names ---------------------------------------------------------------------------
CAP = rules(limits={"max_tokens": (None, 5)}, set={"temperature": 0.0, "stop": ["x"]},
            strip={"seed"})


def _sent(path: str, body: dict[str, Any], rule: RequestRules = CAP) -> tuple[dict[str, Any], Any]:
    raw, changes = apply_to_request(path, json.dumps(body).encode(), rule)
    return json.loads(raw), changes


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions", "/v1/completions"])
def test_openai_names(path: str) -> None:
    body, changes = _sent(path, {"model": "m", "max_completion_tokens": 100, "seed": 1,
                                 "temperature": 1.5})
    assert body == {"model": "m", "max_tokens": 5, "temperature": 0.0, "stop": ["x"]}
    assert changes["max_tokens"] == [100, 5]
    # llama-server reads n_predict before its OpenAI aliases: a caller cannot slip past the cap
    body, _ = _sent(path, {"max_tokens": 3, "n_predict": 100000})
    assert body["max_tokens"] == 5 and "n_predict" not in body


@pytest.mark.parametrize("path", ["/completion", "/completions", "/infill"])
def test_llama_server_native_names(path: str) -> None:
    body, changes = _sent(path, {"prompt": "hi", "n_predict": 400})
    assert body == {"prompt": "hi", "n_predict": 5, "temperature": 0.0, "stop": ["x"]}
    assert changes["max_tokens"] == [400, 5]
    assert _sent(path, {"prompt": "hi"})[0]["n_predict"] == 5


def test_responses_names() -> None:
    body, changes = _sent("/v1/responses", {"input": "hi", "max_output_tokens": 99})
    assert body == {"input": "hi", "max_output_tokens": 5, "temperature": 0.0, "stop": ["x"]}
    assert changes["max_tokens"] == [99, 5]


def test_anthropic_names_and_what_it_carries() -> None:
    body, changes = _sent("/v1/messages", {"model": "m", "max_tokens": 1024, "temperature": 1,
                                           "stop_sequences": ["y"], "messages": []})
    assert body == {"model": "m", "max_tokens": 5, "temperature": 0.0, "stop_sequences": ["x"],
                    "messages": []}
    assert changes == {"max_tokens": [1024, 5], "temperature": [1, 0.0],
                       "stop": [["y"], ["x"]]}
    # llama-server takes no min_p, seed, ... from an Anthropic body: nothing to rule there
    assert _sent("/v1/messages", {"max_tokens": 1}, rules(set={"min_p": 0.1}))[1] == {}


def test_ollama_options_arrive_in_openai_names() -> None:
    # what launcher.proxy.ollama sends for options {num_predict, temperature, top_k, ...}
    options = {"num_predict": 4096, "temperature": 0.9, "top_k": 100, "repeat_penalty": 1.3,
               "seed": 42}
    chat = {"model": "m", "messages": [], "stream": False, **sampling_fields(options)}
    rule = rules(limits={"max_tokens": (None, 512), "top_k": (None, 40),
                         "repeat_penalty": (None, 1.1)}, set={"temperature": 0.0})
    body, changes = _sent("/v1/chat/completions", chat, rule)
    assert (body["max_tokens"], body["temperature"], body["top_k"], body["repeat_penalty"],
            body["seed"]) == (512, 0.0, 40, 1.1, 42)
    assert changes == {"max_tokens": [4096, 512], "temperature": [0.9, 0.0], "top_k": [100, 40],
                       "repeat_penalty": [1.3, 1.1]}
    # num_predict -1 (until the context ends) is not sent: the cap is
    assert _sent("/v1/chat/completions", sampling_fields({"num_predict": -1}), rule)[0][
        "max_tokens"] == 512


def test_other_routes_and_bodies_pass_unchanged() -> None:
    for path, raw in [("/v1/embeddings", b'{"input": "x", "seed": 1}'),
                      ("/tokenize", b'{"content": "x"}'),
                      ("/v1/chat/completions", b"not json"),
                      ("/v1/chat/completions", b"[1, 2]")]:
        assert apply_to_request(path, raw, CAP) == (raw, {})


# --- the activity entry -------------------------------------------------------------------------
async def test_activity_entry_and_sqlite_copy_show_the_change(tmp_path: Path) -> None:
    path = tmp_path / "activity.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db:  # a copy an older lalo wrote
        db.execute("CREATE TABLE activity (time, model, route, status, duration, ttft, "
                   "prompt_tokens, completion_tokens, tokens_per_s, key, client, request, "
                   "response)")
        db.commit()
    activity = Activity(ActivityConfig(store=True), store_path=path)
    changed = {"temperature": [0.9, 0.0], "max_tokens": [4096, 512]}
    activity.record("m", "chat", 200, time.perf_counter(), None, b"", params_changed=changed)
    activity.record("m", "chat", 200, time.perf_counter(), None, b"")
    rows = activity.query()
    assert rows[1]["params_changed"] == changed and "params_changed" not in rows[0]
    activity.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        stored = [value and json.loads(value) for (value,) in
                  db.execute("SELECT params_changed FROM activity ORDER BY rowid")]
    assert stored == [changed, None]
