"""The proxy's request path with the real SmolLM2 model: nothing lost, nothing left running.

A client that leaves cancels its request upstream at once (llama-server's `/slots` shows the
slot idle), also a non-streamed one while another slot streams (lalo asks for a stream and puts
the answer back together, identical to llama-server's own: the models here run behind a wrapper
script, which lalo treats as a llama-server it did not build, without patch 0004), a queued
client that leaves frees
its place, HEAD and percent-encoded paths pass
through `/upstream/...`, a model server killed before it answered is asked again, and a
streamed request that waits for a slow load hears about it (SSE comments, then the answer or
the error event).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.support.lalo import FAST_SUPERVISOR, LaloUp, lalo_env, wait_until, write_config

pytestmark = pytest.mark.integration

SLOW_START = 4.0  # seconds the wrapper waits before it starts llama-server for `slow`
# Pieces of prose for long generations: SmolLM2 at temperature 0 does not stop on its own
# when told to ignore end-of-sequence.
LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def lalo(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path,
         smollm2: Path) -> Iterator[LaloUp]:
    """`smol`: preloaded, one slot; `slow` and `broken`: on demand, behind a wrapper that
    delays (or fails) their start the way a big model's load would."""
    tmp = tmp_path_factory.mktemp("request-path")
    wrapper = tmp / "llama-server-wrapper"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1" != "--version" ]; then\n'
        '  if [ -n "$LALO_TEST_SLOW_START" ]; then sleep "$LALO_TEST_SLOW_START"; fi\n'
        '  if [ -n "$LALO_TEST_FAIL_START" ]; then echo "failing on purpose" >&2; exit 3; fi\n'
        "fi\n"
        f'exec "{llama_server_bin}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    common = {"file": str(smollm2), "ctx_size": 2048, "threads": 1}
    config = write_config(
        tmp / "lalo.yaml",
        {
            "smol": {**common, "parallel": 1},
            "duo": {**common, "parallel": 2, "preload": False},
            "slow": {**common, "preload": False, "env": {"LALO_TEST_SLOW_START": str(SLOW_START)}},
            "broken": {**common, "preload": False,
                       "env": {"LALO_TEST_SLOW_START": "2", "LALO_TEST_FAIL_START": "1"}},
        },
        engines={"llama_server": {"path": str(wrapper)}},
        supervisor=FAST_SUPERVISOR,
        proxy={"queue_size": 4},
    )
    with LaloUp(config, lalo_env(tmp / "state", tmp / "config")) as up:
        up.wait_state("smol", "ready")
        yield up


def server_key(pid: int) -> str:
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"LLAMA_API_KEY="):
            return item.split(b"=", 1)[1].decode()
    raise AssertionError("no key in the child's environment")


class Server:
    """Direct reads of smol's llama-server (its current process)."""

    def __init__(self, lalo: LaloUp, name: str = "smol") -> None:
        model = lalo.model(name)
        self.pid = model["pid"]
        self.url = f"http://127.0.0.1:{model['port']}"
        self.headers = {"Authorization": f"Bearer {server_key(self.pid)}"}

    def processing(self) -> bool:
        return self.busy() > 0

    def busy(self) -> int:
        slots = httpx.get(self.url + "/slots", headers=self.headers, timeout=5).json()
        return sum(bool(slot["is_processing"]) for slot in slots)

    def idle(self) -> bool:
        return not self.processing()


class CpuQuiet:
    """True once the process used (almost) no CPU since the last call: its generation stopped.

    Watched from outside on purpose: llama-server checks whether a non-streamed client is
    still there once a second, but any other answer it produces (a `/slots` read, too)
    restarts that second, so polling `/slots` would itself keep it from noticing.
    """

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.last = self._cpu()
        self.since = time.monotonic()

    def _cpu(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def __call__(self) -> bool:
        if time.monotonic() - self.since < 0.2:
            return False  # too soon to tell: CPU time comes in 10 ms ticks
        now, at = self._cpu(), time.monotonic()
        quiet = now - self.last < 0.1 * (at - self.since)  # generating takes a whole core
        self.last, self.since = now, at
        return quiet


def open_request(lalo: LaloUp, body: dict[str, Any], path: str = "/v1/completions") -> socket.socket:
    """A raw client connection that sends one request and does not read the answer."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", lalo.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{lalo.port}\r\n"
                 f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n".encode()
                 + data)
    return sock


def quick_completion(lalo: LaloUp, model: str = "smol") -> float:
    started = time.monotonic()
    response = httpx.post(lalo.url + "/v1/completions", timeout=60, json={
        "model": model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def test_a_client_that_leaves_a_non_streamed_request_frees_the_slot_at_once(lalo: LaloUp) -> None:
    # Before: the watcher started only for streams, so llama-server generated all 1,500 tokens.
    server = Server(lalo)
    client = open_request(lalo, {"model": "smol", "prompt": "Write a long story.", **LONG})
    wait_until(server.processing, 30, message="smol to start generating")
    client.close()
    wait_until(CpuQuiet(server.pid), 2.0, interval=0.05, message="generation to stop")
    assert server.idle()
    assert quick_completion(lalo) < 10  # served at once, not after 1,500 tokens
    assert lalo.model("smol")["in_flight"] == 0


def test_a_non_streamed_client_that_leaves_while_another_streams_frees_its_slot(
        lalo: LaloUp) -> None:
    # Before: the non-streamed request kept its slot to the end (1,500 tokens): llama-server
    # looks for a gone non-streamed client only after a second without a result for any
    # request, and the other slot's stream produced one every few milliseconds.
    httpx.post(lalo.url + "/api/models/duo/load", timeout=60).raise_for_status()
    server = Server(lalo, "duo")
    stream_body = {"model": "duo", "prompt": "Write a long story.", "stream": True, **LONG}
    with httpx.stream("POST", lalo.url + "/v1/completions", json=stream_body,
                      timeout=60) as streamed:
        lines = streamed.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # the stream runs
        client = open_request(lalo, {"model": "duo", "messages": [
            {"role": "user", "content": "Write another long story."}], **LONG},
            path="/v1/chat/completions")
        wait_until(lambda: server.busy() == 2, 30, message="both of duo's slots to generate")
        client.close()
        left = time.monotonic()
        wait_until(lambda: server.busy() == 1, 5, interval=0.05,
                   message="the abandoned request's slot to stop")
        stopped_after = time.monotonic() - left
        assert next(line for line in lines if line.startswith("data:"))  # still streaming
    wait_until(lambda: server.busy() == 0, 5, interval=0.05, message="the stream to stop")
    assert stopped_after < 2, stopped_after
    assert lalo.model("duo")["in_flight"] == 0


# Fields that differ between two answers to the same request: ids, clocks, what was cached.
_VOLATILE = {"id", "created", "created_at", "completed_at", "timings", "system_fingerprint",
             "id_slot", "prompt_tokens_details", "input_tokens_details", "cache_read_input_tokens",
             "tokens_cached", "call_id"}


def _stable(value: Any) -> Any:
    if isinstance(value, dict) and "cache_read_input_tokens" in value:  # Anthropic's usage
        value = {**value, "input_tokens": value["input_tokens"] + value["cache_read_input_tokens"]}
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
ASK = [{"role": "user", "content": "What is the capital of France?"}]
CHATML_HI = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
             "Say only: hi<|im_end|>\n<|im_start|>assistant\n")  # ends with end-of-text
SAME_AS_DIRECT = {
    "chat": ("/v1/chat/completions", {"messages": ASK, "max_tokens": 16}),
    "chat, logprobs, n=2": ("/v1/chat/completions", {
        "messages": ASK, "max_tokens": 4, "logprobs": True, "top_logprobs": 2, "n": 2}),
    "chat, tools": ("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Weather in Paris? Use the tool."}],
        "max_tokens": 40, "tools": [{"type": "function", "function": {
            "name": "get_weather", "parameters": WEATHER}}], "tool_choice": "required"}),
    "completions, logprobs, stop": ("/v1/completions", {
        "prompt": "The capital of France is", "max_tokens": 8, "logprobs": 2, "stop": ["."]}),
    "native": ("/completion", {"prompt": "The capital of France is", "n_predict": 6,
                               "n_probs": 2}),
    "native, tokens": ("/completion", {"prompt": "The capital of France is", "n_predict": 6,
                                       "return_tokens": True}),
    "native, probs, stop word": ("/completion", {"prompt": "The capital of France is",
                                                 "n_predict": 8, "n_probs": 1, "stop": ["."]}),
    "native, probs, end of text": ("/completion", {"prompt": CHATML_HI, "n_predict": 30,
                                                   "n_probs": 1}),
    "completions, logprobs, end of text": ("/v1/completions", {
        "prompt": CHATML_HI, "max_tokens": 30, "logprobs": 1, "stop": ["zzz"]}),
    "anthropic messages": ("/v1/messages", {"messages": ASK, "max_tokens": 16}),
    "anthropic, tools": ("/v1/messages", {
        "messages": [{"role": "user", "content": "Weather in Paris? Use the tool."}],
        "max_tokens": 40, "tools": [{"name": "get_weather", "input_schema": WEATHER}],
        "tool_choice": {"type": "any"}}),
    "responses": ("/v1/responses", {"input": "What is the capital of France?",
                                    "max_output_tokens": 16}),
}


@pytest.mark.parametrize("case", SAME_AS_DIRECT)
def test_a_non_streamed_answer_is_the_one_llama_server_gives(lalo: LaloUp, case: str) -> None:
    # lalo asks for a stream and puts the answer together: field for field what llama-server
    # answers the same request not streamed, apart from ids, clocks and cache counters
    path, body = SAME_AS_DIRECT[case]
    body = {**body, "model": "duo", "temperature": 0, "seed": 1}
    httpx.post(lalo.url + "/api/models/duo/load", timeout=60).raise_for_status()
    server = Server(lalo, "duo")
    direct = httpx.post(server.url + path, json=body, headers=server.headers, timeout=60)
    through = httpx.post(lalo.url + path, json=body, timeout=60)
    assert (direct.status_code, through.status_code) == (200, 200), through.text
    assert through.headers["content-type"].startswith("application/json")
    assert _stable(through.json()) == _stable(direct.json())
    assert list(through.json()) == list(direct.json())  # keys in llama-server's order


def test_a_queued_client_that_leaves_gives_its_place_back(lalo: LaloUp) -> None:
    # Before: the queued request stayed queued and ran (all of it) once the slot was free.
    server = Server(lalo)
    first = open_request(lalo, {"model": "smol", "prompt": "Write a long story.", **LONG})
    wait_until(server.processing, 30, message="the first request to run")
    queued = open_request(lalo, {"model": "smol", "prompt": "Write another story.", **LONG})
    wait_until(lambda: lalo.model("smol")["queued"] == 1, 10, message="the second to queue")
    queued.close()
    wait_until(lambda: lalo.model("smol")["queued"] == 0, 2, message="the queue to empty")
    first.close()
    wait_until(CpuQuiet(server.pid), 2.0, interval=0.05, message="generation to stop")
    assert server.idle()
    assert quick_completion(lalo) < 10
    status = lalo.model("smol")
    assert (status["in_flight"], status["queued"]) == (0, 0)


def test_a_client_that_leaves_while_its_model_loads_leaves_the_queue(lalo: LaloUp) -> None:
    # Before: the lease wait never looked at the client; the request stayed counted as
    # waiting until the load ended, then ran for nobody.
    httpx.post(lalo.url + "/api/models/slow/unload", timeout=60).raise_for_status()
    client = open_request(lalo, {"model": "slow", "prompt": "x", **LONG})
    wait_until(lambda: lalo.model("slow")["state"] == "starting", 10, message="slow to load")
    assert lalo.model("slow")["queued"] == 1
    client.close()
    wait_until(lambda: lalo.model("slow")["queued"] == 0, 2, message="the request to leave")
    assert lalo.model("slow")["state"] == "starting"  # left before the load ended
    model = lalo.wait_state("slow", "ready")
    assert (model["in_flight"], model["queued"]) == (0, 0)


def test_head_through_upstream(lalo: LaloUp) -> None:
    # Before: 502 after 5 s (the parser waited for a body a HEAD answer never has).
    started = time.monotonic()
    response = httpx.head(lalo.url + "/upstream/smol/health", timeout=30)
    assert response.status_code == 200
    assert time.monotonic() - started < 2
    assert int(response.headers["content-length"]) > 0
    assert response.content == b""
    assert httpx.get(lalo.url + "/upstream/smol/health", timeout=10).json() == {"status": "ok"}


def test_upstream_paths_go_out_as_the_client_sent_them(lalo: LaloUp) -> None:
    # Before: `%20` went out decoded, `GET /a b HTTP/1.1`, which llama-server refused with 400;
    # `%0D%0A` put a line break into the request line.
    for path in ("/upstream/smol/a%20b", "/upstream/smol/x%0D%0AX-Injected:%201"):
        response = httpx.get(lalo.url + path, timeout=10)
        assert response.status_code == 404, (path, response.status_code, response.text)
    assert httpx.get(lalo.url + "/upstream/smol/props?x=%20", timeout=10).status_code == 200


def test_a_streamed_request_waiting_for_a_slow_load_hears_about_it(lalo: LaloUp) -> None:
    httpx.post(lalo.url + "/api/models/slow/unload", timeout=60).raise_for_status()
    started = time.monotonic()
    comments: list[str] = []
    events: list[str] = []
    head_after = None
    body = {"model": "slow", "prompt": "The capital of France is", "max_tokens": 4,
            "stream": True, "temperature": 0}
    with httpx.stream("POST", lalo.url + "/v1/completions", json=body, timeout=120) as response:
        head_after = time.monotonic() - started
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("data:"):
                events.append(line)
    assert head_after < SLOW_START  # the head came while the model was still loading
    assert comments and comments[0] == ": loading slow"
    assert events[-1] == "data: [DONE]"
    assert any(json.loads(e[5:]).get("choices") for e in events[:-1])
    # the fast path is unchanged: a ready model's stream starts with its data, no comments
    with httpx.stream("POST", lalo.url + "/v1/completions", json=body, timeout=60) as response:
        first = next(line for line in response.iter_lines() if line)
    assert first.startswith("data:")


def test_an_upstream_error_after_the_early_head_becomes_the_error_event(lalo: LaloUp) -> None:
    # the head (200) went out while the model loaded; llama-server then refuses the request
    httpx.post(lalo.url + "/api/models/slow/unload", timeout=60).raise_for_status()
    body = {"model": "slow", "stream": True, "max_tokens": 4}  # no prompt
    with httpx.stream("POST", lalo.url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[0] == ": loading slow"
    error = json.loads(lines[-1][5:])["error"]
    assert error["type"] == "invalid_request_error"
    assert "prompt" in error["message"]


def test_a_load_that_fails_ends_the_waiting_stream_with_the_error_event(lalo: LaloUp) -> None:
    body = {"model": "broken", "prompt": "x", "max_tokens": 4, "stream": True}
    lines: list[str] = []
    with httpx.stream("POST", lalo.url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200  # the head went out while it loaded
        lines = [line for line in response.iter_lines() if line]
    assert lines[0] == ": loading broken"
    error = json.loads(lines[-1][5:])["error"]
    assert error["type"] == "unavailable_error"
    assert "broken" in error["message"]
    # not streamed: the plain error envelope, as before
    plain = httpx.post(lalo.url + "/v1/completions", json={**body, "stream": False}, timeout=60)
    assert plain.status_code == 503


def _kill_when_running(lalo: LaloUp, pid: int) -> threading.Thread:
    def kill() -> None:
        wait_until(lambda: lalo.model("smol")["in_flight"] == 1, 30, interval=0.01,
                   message="the request to hold smol's slot")
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_a_server_killed_before_answering_is_asked_again(lalo: LaloUp) -> None:
    # Before: 502 "broke off" although the client had not seen a byte.
    pid = lalo.model("smol")["pid"]
    killer = _kill_when_running(lalo, pid)
    # a long prompt, never cached: the kill comes while it is read, before any token
    prompt = "Tell me about Paris. " * 150
    response = httpx.post(lalo.url + "/v1/completions", timeout=120, json={
        "model": "smol", "prompt": prompt, "max_tokens": 8, "temperature": 0,
        "cache_prompt": False})
    killer.join(5)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"]
    model = lalo.wait_state("smol", "ready")
    assert model["pid"] != pid


def test_a_stream_whose_server_dies_before_the_first_token_is_asked_again(lalo: LaloUp) -> None:
    lalo.wait_state("smol", "ready")
    pid = lalo.model("smol")["pid"]
    killer = _kill_when_running(lalo, pid)
    prompt = "Tell me about Rome. " * 150  # another prompt: the last test's retry cached its own
    body = {"model": "smol", "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True,
            "cache_prompt": False}
    with httpx.stream("POST", lalo.url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    killer.join(5)
    assert events[-1] == "data: [DONE]"
    assert not any('"error"' in event for event in events), events
    assert lalo.wait_state("smol", "ready")["pid"] != pid
