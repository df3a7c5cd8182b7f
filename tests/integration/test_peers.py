"""Peers across hosts: three lalos, each in its own network namespace on one bridge, one model
each (A: the real SmolLM2, B and C: random weights, and both B and C serve `shared`), every
lalo naming the other two as peers with `models: auto` and keys from the environment.

Every model answers through every lalo (SmolLM2 says Paris through a peer hop, a stream comes
through the openai SDK); then B is killed mid-stream: the stream ends with an error event,
`shared` fails over to C, `beta` answers 503 with Retry-After, the rest is unaffected; B is
started again and served again. Namespaces and processes go even when the test fails.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.support.lalo import FAST_SUPERVISOR, lalo_env, wait_until, write_config
from tests.support.netns import Network, netns_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(netns_available() is not None, reason=str(netns_available())),
]

PORT = 18080  # the same in every namespace: each is a host of its own
CHECKS = {"health_interval": 0.5, "health_timeout": 1.0, "max_failures": 2}
QUESTION = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


class Instance:
    """`lalo up` inside a namespace, on its own address, with its own key and state dir."""

    def __init__(self, name: str, netns: str, address: str, config: Path, env: dict[str, str]) -> None:
        self.name = name
        self.netns = netns
        self.url = f"http://{address}:{PORT}"
        self.address = address
        self.config = config
        self.env = env
        self.key = f"key-{name}"
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = config.parent / f"lalo-{name}.log"

    def start(self) -> Instance:
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m", "launcher", "up",
                 "--config", str(self.config), "--host", self.address, "--port", str(PORT)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True)
        wait_until(self.answers, 60, message=f"lalo {self.name} on {self.url}")
        return self

    def answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"lalo {self.name} exited with {self.proc.returncode}:\n"
                                 f"{self.log_path.read_text()}")
        try:
            return httpx.get(self.url + "/health", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}

    def get(self, path: str) -> Any:
        answer = httpx.get(self.url + path, headers=self.headers(), timeout=10)
        answer.raise_for_status()
        return answer.json()

    def chat(self, model: str, **extra: Any) -> httpx.Response:
        body = {"model": model, "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "hi"}], **extra}
        return httpx.post(self.url + "/v1/chat/completions", json=body, headers=self.headers(),
                          timeout=120)

    def peer_state(self, peer: str) -> str:
        return str(next(p for p in self.get("/api/status")["peers"] if p["name"] == peer)["state"])

    def upstream(self, path: str) -> Any:  # what tests.support.lalo.generating asks
        return self.get(f"/upstream/{path}")

    def kill(self) -> None:
        """SIGKILL lalo and its model servers: the machine is gone, nothing drains."""
        assert self.proc is not None
        family = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        for child in family:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def network() -> Iterator[Network]:
    net = Network()
    try:
        yield net
    finally:
        net.close()  # kills what still runs inside, deletes namespaces and links


@pytest.fixture
def cluster(network: Network, tmp_path: Path, llama_server_bin: Path, smollm2: Path,
            small_model: Path, small_model_b: Path, small_model_c: Path) -> Iterator[dict[str, Instance]]:
    models = {
        "a": {"alpha": {"file": str(smollm2)}},
        # two slots (/upstream/beta/slots takes one while a stream holds the other) of 16k
        # tokens: room for a generation that only a disconnect ends early
        "b": {"beta": {"file": str(small_model_b), "parallel": 2, "ctx_size": 32768},
              "shared": {"file": str(small_model)}},
        "c": {"gamma": {"file": str(small_model_c)}, "shared": {"file": str(small_model)}},
    }
    hosts = {name: network.add(name) for name in models}
    keys = {f"PEER_{name.upper()}_KEY": f"key-{name}" for name in models}
    instances = {}
    for name, (netns, address) in hosts.items():
        home = tmp_path / name
        home.mkdir()
        peers = {other: {"url": f"http://{hosts[other][1]}:{PORT}",
                         "api_key_env": f"PEER_{other.upper()}_KEY", **CHECKS}
                 for other in models if other != name}
        config = write_config(home / "lalo.yaml", models[name], supervisor=FAST_SUPERVISOR,
                              proxy={"api_keys": [f"key-{name}"]}, peers=peers)
        env = lalo_env(home / "state", home / "config", keys)
        instances[name] = Instance(name, netns, address, config, env)
    try:
        for instance in instances.values():
            instance.start()
        yield instances
    finally:
        for instance in instances.values():
            instance.stop()


def generating(instance: Instance, model: str) -> bool:
    """Whether any slot of `model`'s server on that lalo is working on a request."""
    return any(slot["is_processing"] for slot in instance.upstream(f"{model}/slots"))


def tokens_predicted(instance: Instance, model: str) -> float:
    """llama-server's count of tokens `model` generated so far (its /metrics, through lalo)."""
    text = httpx.get(f"{instance.url}/upstream/{model}/metrics", headers=instance.headers(),
                     timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("llamacpp:tokens_predicted_total"))


def _all_peers_up(instances: dict[str, Instance]) -> bool:
    for instance in instances.values():
        for peer in instance.get("/api/status")["peers"]:
            if peer["state"] != "up" or not peer["models"]:
                return False
    return True


def test_three_lalos_serve_each_others_models_and_survive_a_peer_going_away(
        cluster: dict[str, Instance]) -> None:
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    wait_until(lambda: _all_peers_up(cluster), 60, message="every peer up on every lalo")

    # /v1/models: local ones as before, peers' marked remote with the peer that serves them
    listed = {m["id"]: m for m in a.get("/v1/models")["data"]}
    assert listed["alpha"]["owned_by"] == "lalo"
    assert listed["beta"]["owned_by"] == "peer:b"
    assert listed["gamma"]["owned_by"] == "peer:c"
    assert listed["shared"]["lalo"]["peers"] == ["b", "c"]
    assert listed["beta"]["lalo"] == {"remote": True, "peer": "b", "peers": ["b"],
                                      "peer_state": "up"}
    status = a.get("/api/status")
    assert "key-b" not in json.dumps(status)  # peers' keys never show

    # every model through every lalo; the real model answers through a peer hop
    for instance in cluster.values():
        for model in ("alpha", "beta", "gamma", "shared"):
            answer = instance.chat(model)
            assert answer.status_code == 200, (instance.name, model, answer.text)
            assert answer.json()["model"] == model
    for via in (b, c):
        answer = via.chat("alpha", messages=QUESTION, max_tokens=24)
        assert "Paris" in answer.json()["choices"][0]["message"]["content"]
    client = openai.OpenAI(base_url=c.url + "/v1", api_key=c.key, max_retries=0)
    chunks = list(client.chat.completions.create(
        model="alpha", messages=QUESTION, max_tokens=24, temperature=0, stream=True))  # type: ignore[arg-type]
    assert "Paris" in "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    # an unknown model names what is known, local and remote
    unknown = a.chat("nope")
    assert unknown.status_code == 404 and "gamma" in unknown.json()["error"]["message"]
    # a request that came from a peer is never sent on (one hop: no chains, no loops)
    hop = httpx.post(b.url + "/v1/chat/completions", timeout=10,
                     json={"model": "gamma", "messages": [{"role": "user", "content": "hi"}]},
                     headers={**b.headers(), "x-lalo-hop": "1"})
    assert hop.status_code == 404, hop.text
    # the peer's key is checked: a lalo that is given a wrong key cannot use B
    assert httpx.post(b.url + "/v1/chat/completions", json={"model": "beta"},
                      headers={"authorization": "Bearer key-a"}, timeout=10).status_code == 401

    # errors come back as the peer made them: the same status and body as asked of B directly
    bad = {"model": "beta", "messages": "not a list"}
    direct = httpx.post(b.url + "/v1/chat/completions", json=bad, headers=b.headers(), timeout=30)
    through = httpx.post(a.url + "/v1/chat/completions", json=bad, headers=a.headers(), timeout=30)
    assert direct.status_code >= 400 and through.status_code == direct.status_code
    assert through.json()["error"]["message"] == direct.json()["error"]["message"]

    # a client that goes away mid-stream stops the generation on the peer's model server
    long = {"model": "beta", "max_tokens": 16_000, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "go on"}]}
    before = tokens_predicted(b, "beta")
    with httpx.stream("POST", a.url + "/v1/chat/completions", json=long, headers=a.headers(),
                      timeout=60) as answer:
        for line in answer.iter_lines():
            if line.startswith("data:") and generating(b, "beta"):
                break
    wait_until(lambda: not generating(b, "beta"), 60, message="B's beta to stop generating")
    cut_at = tokens_predicted(b, "beta") - before
    assert cut_at < 8_000, f"B generated {cut_at:g} tokens for a client that had gone"

    # B is killed while a long stream of beta runs through A
    events: list[str] = []
    streaming = threading.Event()

    def stream() -> None:
        body = {"model": "beta", "max_tokens": 20_000, "stream": True,
                "messages": [{"role": "user", "content": "go on"}]}
        with httpx.stream("POST", a.url + "/v1/chat/completions", json=body,
                          headers=a.headers(), timeout=60) as answer:
            for line in answer.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
                    streaming.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert streaming.wait(60), "the stream through A never started"
    b.kill()
    reader.join(60)
    assert not reader.is_alive(), "the stream did not end when its peer died"
    assert "broke off" in events[-1] and '"code"' in events[-1], events[-3:]

    # shared fails over to C at once (a refused connection marks B down), beta answers 503
    failover = a.chat("shared")
    assert failover.status_code == 200, failover.text
    wait_until(lambda: a.peer_state("b") == "down" and c.peer_state("b") == "down", 30,
               message="B marked down on A and C")
    down = a.chat("beta")
    assert down.status_code == 503, down.text
    assert int(down.headers["retry-after"]) >= 1
    assert down.json()["error"]["code"] == "peer_unavailable"
    assert a.get("/v1/models")["data"] and \
        {m["id"]: m for m in a.get("/v1/models")["data"]}["beta"]["state"] == "unavailable"
    shown = subprocess.run([sys.executable, "-m", "launcher", "status"], env=a.env,
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"peer b (http://{b.address}:{PORT}): down: beta, shared" in shown, shown
    # the others are unaffected
    for instance, model in ((a, "gamma"), (c, "alpha"), (c, "shared"), (a, "alpha")):
        answer = instance.chat(model)
        assert answer.status_code == 200, (instance.name, model, answer.text)

    # B comes back: served again through A and C
    b.start()
    wait_until(lambda: a.peer_state("b") == "up" and c.peer_state("b") == "up", 60,
               message="B up again on A and C")
    for via in (a, c):
        answer = via.chat("beta")
        assert answer.status_code == 200, answer.text
    assert {p["name"]: p["requests"] for p in a.get("/api/status")["peers"]}["b"] >= 3
