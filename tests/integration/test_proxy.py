"""The OpenAI port: the official `openai` client against `lalo up` with real llama-server children."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from launcher import client as lalo_client
from tests.support.lalo import LaloUp, wait_until, write_config

pytestmark = pytest.mark.integration

FAST = {"health_interval": 0.3, "liveness_timeout": 3.0, "backoff_initial": 0.3}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path, small_model: Path,
          small_model_b: Path) -> Iterator[LaloUp]:
    """Two preloaded models, one on-demand model, one embeddings model; queue of 1."""
    tmp = tmp_path_factory.mktemp("proxy")
    from tests.support.lalo import lalo_env

    env = lalo_env(tmp / "state", tmp / "config")
    config = write_config(
        tmp / "lalo.yaml",
        {
            "alpha": {"file": str(small_model), "ctx_size": 8192, "aliases": ["first"]},
            "beta": {"file": str(small_model_b), "ctx_size": 1024},
            "lazy": {"file": str(small_model), "ctx_size": 512, "preload": False},
            # a generative model has no pooling of its own: OpenAI embeddings need one
            "embed": {"file": str(small_model_b), "ctx_size": 512, "embeddings": True,
                      "preload": False, "args": ["--pooling", "mean"]},
        },
        engines={"llama_server": {"path": str(llama_server_bin)}},
        supervisor=FAST,
        proxy={"queue_size": 1, "max_body_size": "64KiB"},
    )
    with LaloUp(config, env) as up:
        up.wait_state("alpha", "ready")
        up.wait_state("beta", "ready")
        yield up


@pytest.fixture
def api(proxy: LaloUp) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_without_and_with_stream(api: openai.OpenAI) -> None:
    reply = api.chat.completions.create(model="alpha", max_tokens=8,
                                        messages=[{"role": "user", "content": "hello"}])
    assert reply.model == "alpha"
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    chunks = list(api.chat.completions.create(
        model="alpha", max_tokens=12, stream=True,
        messages=[{"role": "user", "content": "hello"}]))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 10  # token by token, not one buffered blob
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_and_alias(api: openai.OpenAI) -> None:
    reply = api.completions.create(model="first", prompt="once upon", max_tokens=5)
    assert reply.model == "alpha"
    assert reply.choices[0].text


def test_models_list_names_every_model_and_alias(api: openai.OpenAI) -> None:
    ids = [m.id for m in api.models.list()]
    assert ids == ["alpha", "first", "beta", "lazy", "embed"]


def test_each_model_is_answered_by_its_own_server(proxy: LaloUp) -> None:
    paths = {}
    for name in ("alpha", "beta"):
        props = httpx.get(f"{proxy.url}/upstream/{name}/props", timeout=30).json()
        paths[name] = props["model_path"]
    assert paths["alpha"].endswith("small-a.gguf")
    assert paths["beta"].endswith("small-b.gguf")


def test_on_demand_model_loads_on_first_request(proxy: LaloUp, api: openai.OpenAI) -> None:
    assert proxy.model("lazy")["state"] == "stopped"
    reply = api.completions.create(model="lazy", prompt="x", max_tokens=2)
    assert reply.model == "lazy"
    assert proxy.model("lazy")["state"] == "ready"


def test_embeddings(api: openai.OpenAI) -> None:
    result = api.embeddings.create(model="embed", input=["one", "two"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 256  # the small model's n_embd


def test_error_envelopes(proxy: LaloUp) -> None:
    url = proxy.url + "/v1/chat/completions"

    def error(response: httpx.Response) -> dict[str, str]:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}
        return dict(body["error"])

    bad_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and error(bad_json)["code"] == "bad_request"
    no_model = httpx.post(url, json={"messages": []})
    assert no_model.status_code == 400 and error(no_model)["code"] == "model_required"
    unknown = httpx.post(url, json={"model": "gpt-9", "messages": []})
    assert unknown.status_code == 404
    assert error(unknown)["message"] == (
        "unknown model 'gpt-9'; known: alpha, first, beta, lazy, embed")
    too_big = httpx.post(url, json={"model": "alpha", "prompt": "x" * 70_000})
    assert too_big.status_code == 413 and error(too_big)["code"] == "request_too_large"
    no_route = httpx.get(proxy.url + "/v2/nothing")
    assert no_route.status_code == 404 and error(no_route)["code"] == "not_found"
    foreign = httpx.post(url, json={"model": "alpha"}, headers={"origin": "https://evil.example"})
    assert foreign.status_code == 403


def test_queue_full_is_429_with_retry_after(proxy: LaloUp) -> None:
    # alpha: 1 slot, queue of 1: one running, one waiting, the third is refused. Its 8k
    # context holds thousands of tokens: long enough to look while both wait.
    body = {"model": "alpha", "prompt": "x", "max_tokens": 7000, "stream": True,
            "ignore_eos": True}
    release = threading.Event()
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            with httpx.stream("POST", proxy.url + "/v1/completions", json=body, timeout=60) as r:
                for _ in r.iter_bytes():
                    if release.is_set():
                        break
        except BaseException as exc:
            errors.append(exc)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for thread in holders:
        thread.start()
    try:
        wait_until(lambda: (m := proxy.model("alpha"))["in_flight"] == 1 and m["queued"] == 1, 30,
                   message="one running and one queued")
        refused = httpx.post(proxy.url + "/v1/completions", json={**body, "stream": False})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
    finally:
        release.set()
        for thread in holders:
            thread.join(60)
    assert not errors


def test_client_disconnect_stops_upstream_generation(proxy: LaloUp) -> None:
    port = proxy.model("alpha")["port"]
    body = {"model": "alpha", "prompt": "go", "max_tokens": 7000, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", proxy.url + "/v1/completions", json=body, timeout=60) as response:
        received = 0
        for _chunk in response.iter_bytes():
            received += 1
            if received >= 5:
                break  # leave mid-stream: the context manager closes the connection
    key = _server_key(proxy, "alpha")

    def idle() -> bool:
        slots = httpx.get(f"http://127.0.0.1:{port}/slots",
                          headers={"Authorization": f"Bearer {key}"}).json()
        return not any(slot["is_processing"] for slot in slots)

    wait_until(idle, 3.0, message="llama-server to stop generating after the client left")
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics",
                        headers={"Authorization": f"Bearer {key}"}).text
    predicted = [line for line in metrics.splitlines()
                 if line.startswith("llamacpp:tokens_predicted_total")]
    assert predicted and float(predicted[0].split()[-1]) < 7000


def test_child_killed_mid_stream_gives_an_error_event_and_comes_back(
    proxy: LaloUp, api: openai.OpenAI
) -> None:
    pid = proxy.model("alpha")["pid"]
    body = {"model": "alpha", "prompt": "go", "max_tokens": 7000, "stream": True,
            "ignore_eos": True}
    events: list[str] = []
    with httpx.stream("POST", proxy.url + "/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(line)
            if len(events) == 3:
                os.kill(pid, signal.SIGKILL)
    last = json.loads(events[-1][5:])
    assert last["error"]["type"] == "upstream_error"
    assert "broke off the stream" in last["error"]["message"]
    wait_until(lambda: (m := proxy.model("alpha"))["state"] == "ready" and m["pid"] != pid, 30,
               message="alpha back")
    assert api.completions.create(model="alpha", prompt="x", max_tokens=2).choices


def test_launcher_client_against_the_same(proxy: LaloUp) -> None:
    import asyncio

    async def scenario() -> None:
        async with lalo_client.LaloClient(proxy.url) as lalo:
            text = await lalo.generate("hello", model="beta", max_tokens=6, temperature=0)
            assert isinstance(text, str) and text
            pieces = [p async for p in lalo.stream_generate("hello", model="beta", max_tokens=6)]
            assert len(pieces) >= 3
            assert "first" in await lalo.list_models()
            info = await lalo.get_model_info("first")
            assert info["name"] == "alpha" and info["state"] == "ready"
            with pytest.raises(lalo_client.ModelNotFoundError) as caught:
                await lalo.generate("x", model="nope")
            assert caught.value.status == 404 and caught.value.code == "model_not_found"
            vectors = await lalo.embed(["a"], model="embed")
            assert len(vectors[0]) == 256

    asyncio.run(scenario())


def test_an_idle_client_connection_outlives_clients_keep_alive(proxy: LaloUp) -> None:
    """A client that pauses as long as its pool keeps connections (httpx and the OpenAI SDK:
    5 s, uvicorn's own default too) must not find the proxy closing that connection as it
    sends the next request: the proxy keeps idle connections longer than clients do."""
    import socket
    import time
    from urllib.parse import urlsplit

    from launcher.serve.proxy_server import CLIENT_KEEPALIVE_S

    assert lalo_client.KEEPALIVE_S < CLIENT_KEEPALIVE_S
    where = urlsplit(proxy.url)
    request = f"GET /health HTTP/1.1\r\nHost: {where.netloc}\r\n\r\n".encode()
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        for pause in (0.0, 6.0):
            time.sleep(pause)
            sock.sendall(request)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(65536)
                assert chunk, f"the proxy closed the connection after {pause:g} s idle"
                head += chunk
            status, rest = head.split(b"\r\n", 1)
            assert status.startswith(b"HTTP/1.1 200"), status
            headers, body = rest.split(b"\r\n\r\n", 1)
            length = int(next(line.split(b":", 1)[1] for line in headers.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(body) < length:
                body += sock.recv(65536)


def test_metrics_count_requests_and_tokens(proxy: LaloUp, api: openai.OpenAI) -> None:
    api.completions.create(model="beta", prompt="x", max_tokens=3)
    text = httpx.get(proxy.url + "/metrics").text
    assert 'lalo_requests_total{model="beta",route="completions",status="200"}' in text
    assert 'lalo_completion_tokens_total{model="beta"}' in text
    assert "lalo_time_to_first_token_seconds_bucket" in text
    assert "process_resident_memory_bytes" in text


def _server_key(proxy: LaloUp, name: str) -> str:
    """The per-start key, from the child's private environment (same user as the test)."""
    pid = proxy.model(name)["pid"]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for item in environ:
        if item.startswith(b"LLAMA_API_KEY="):
            return item.split(b"=", 1)[1].decode()
    raise AssertionError("no key in the child's environment")


# --- separate instances: auth, eviction, timeouts ---------------------------------------------

def test_api_keys_required_except_health(tmp_path: Path, isolated: dict[str, str],
                                         llama_server_bin: Path, small_model: Path) -> None:
    config = write_config(tmp_path / "lalo.yaml", {"m": {"file": str(small_model), "ctx_size": 512}},
                          engines={"llama_server": {"path": str(llama_server_bin)}},
                          proxy={"api_keys": ["sk-config"]})
    env = {**isolated, "LALO_API_KEYS": "sk-env-1,sk-env-2"}
    with LaloUp(config, env) as up:
        assert httpx.get(up.url + "/health").status_code == 200
        denied = httpx.get(up.url + "/v1/models")
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.get(up.url + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        for key in ("sk-config", "sk-env-2"):
            ok = openai.OpenAI(base_url=up.url + "/v1", api_key=key, max_retries=0)
            assert [m.id for m in ok.models.list()] == ["m"]
        assert httpx.get(up.url + "/api/status").status_code == 401
        # the CLI uses the admin token from the state file
        status = subprocess.run([sys.executable, "-m", "launcher", "status", "--json"],
                                env=env, capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr


def test_eviction_under_a_small_budget(tmp_path: Path, isolated: dict[str, str],
                                       llama_server_bin: Path, small_model: Path,
                                       small_model_b: Path) -> None:
    # max_loaded 1 and a budget that holds one model: alternating requests all succeed
    config = write_config(
        tmp_path / "lalo.yaml",
        {"a": {"file": str(small_model), "ctx_size": 512, "preload": False},
         "b": {"file": str(small_model_b), "ctx_size": 512, "preload": False}},
        engines={"llama_server": {"path": str(llama_server_bin)}},
        resources={"max_loaded": 1},
    )
    with LaloUp(config, isolated) as up:
        api = openai.OpenAI(base_url=up.url + "/v1", api_key="x", max_retries=0, timeout=60)
        for name in ("a", "b", "a", "b"):
            assert api.completions.create(model=name, prompt="x", max_tokens=2).model == name
            states = {m["name"]: m["state"] for m in up.status()["models"]}
            other = "b" if name == "a" else "a"
            assert states == {name: "ready", other: "stopped"}
        text = httpx.get(up.url + "/metrics").text
        assert 'lalo_model_evictions_total{model="a"} 2.0' in text


def test_a_model_that_cannot_fit_is_503_with_figures(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, small_model: Path,
) -> None:
    config = write_config(
        tmp_path / "lalo.yaml",
        {"m": {"file": str(small_model), "ctx_size": 512, "preload": False}},
        engines={"llama_server": {"path": str(llama_server_bin)}},
        resources={"ram_budget": "1MiB"},
    )
    with LaloUp(config, isolated) as up:
        reply = httpx.post(up.url + "/v1/completions",
                           json={"model": "m", "prompt": "x", "max_tokens": 1})
        assert reply.status_code == 503
        error = reply.json()["error"]
        assert error["code"] == "insufficient_memory"
        assert error["message"].startswith("m needs ") and "budget 1.00 MiB" in error["message"]


def test_upstream_silent_too_long_is_504(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, small_model: Path,
) -> None:
    config = write_config(
        tmp_path / "lalo.yaml", {"m": {"file": str(small_model), "ctx_size": 8192}},
        engines={"llama_server": {"path": str(llama_server_bin)}},
        proxy={"upstream_timeout": 0.1},
    )
    with LaloUp(config, isolated) as up:
        up.wait_state("m", "ready")
        # silent past 0.1 s: reading a long prompt before the first token (a non-streamed
        # generation goes upstream as a stream: only silence counts, not the answer's length)
        reply = httpx.post(up.url + "/v1/completions", timeout=60, json={
            "model": "m", "prompt": "x " * 3500, "max_tokens": 8, "cache_prompt": False})
        assert reply.status_code == 504
        assert reply.json()["error"]["code"] == "upstream_timeout"


def test_ttl_unloads_an_idle_model(tmp_path: Path, isolated: dict[str, str],
                                   llama_server_bin: Path, small_model: Path) -> None:
    config = write_config(
        tmp_path / "lalo.yaml",
        {"idle": {"file": str(small_model), "ctx_size": 512, "preload": False, "ttl": 1}},
        engines={"llama_server": {"path": str(llama_server_bin)}},
    )
    with LaloUp(config, isolated) as up:
        reply = httpx.post(up.url + "/v1/completions", timeout=60,
                           json={"model": "idle", "prompt": "x", "max_tokens": 2})
        assert reply.status_code == 200
        pid = up.model("idle")["pid"]
        up.wait_state("idle", "stopped", timeout=15)
        assert not psutil_alive(pid)
        log = (Path(isolated["LALO_STATE_DIR"]) / "logs" / "idle.log").read_text()
        assert "stopping: idle for 1 s (ttl)" in log
        # and it comes back on the next request
        again = httpx.post(up.url + "/v1/completions", timeout=60,
                           json={"model": "idle", "prompt": "x", "max_tokens": 2})
        assert again.status_code == 200


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
