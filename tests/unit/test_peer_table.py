"""Peers: config validation, the routing rule, and the health checks against a transport that
answers like a peer (or does not)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from launcher.config import parse_config
from launcher.errors import ConfigError, PeerDownError
from launcher.proxy.peers import PeerTable, PeerView, choose_route, listed_models, peer_keys

GIB = 1024**3


def config(text: str):  # type: ignore[no-untyped-def]
    return parse_config(text, label="lalo.yaml", total_ram=8 * GIB)


# --- config -----------------------------------------------------------------------------------

def test_a_config_with_only_peers_is_valid_and_defaults_to_auto() -> None:
    cfg = config("peers:\n  gpu-box:\n    url: http://10.0.0.5:8080/\n    api_key_env: GPU_KEY\n")
    assert dict(cfg.models) == {}
    peer = cfg.peers["gpu-box"]
    assert peer.url == "http://10.0.0.5:8080"  # no trailing slash
    assert peer.models == "auto"
    assert (peer.health_interval, peer.health_timeout, peer.max_failures) == (5.0, 3.0, 2)


def test_a_list_of_models() -> None:
    cfg = config("peers:\n  p: {url: 'http://h:1', models: [a, b]}\n")
    assert cfg.peers["p"].models == ("a", "b")


@pytest.mark.parametrize(("text", "message"), [
    ("peers:\n  p: {url: 'ftp://h:8443'}\n", "must be http://HOST[:PORT] or https://"),
    ("peers:\n  p: {url: 'h:8080'}\n", "must be http://HOST[:PORT]"),
    ("peers:\n  p: {url: 'http://h', tls_ca_file: ca.pem}\n", "tls_ca_file needs an https"),
    ("peers:\n  p: {url: 'http://h:8080/v1'}\n", "with no path"),
    ("peers:\n  p: {url: 'http://h:99999'}\n", "out of range"),
    ("peers:\n  p: {url: 'http://h', api_key_env: 'sk-123 456'}\n",
     "must be the name of an environment variable"),
    ("peers:\n  p: {url: 'http://h', models: []}\n", "must be 'auto' or a list of model names, got []"),
    ("peers:\n  p: {url: 'http://h', models: ['a b']}\n", "model name 'a b' must match"),
    ("peers:\n  p: {url: 'http://h', models: all}\n", "peers.p.models: must be 'auto' or"),
    ("peers:\n  p: {url: 'http://h', key: x}\n", "peers.p.key"),
    ("peers:\n  p: {api_key_env: K}\n", "peers.p.url"),
    ("peers:\n  'a b': {url: 'http://h'}\n", "peer name 'a b' must match"),
    ("peers:\n  p: {url: 'http://h', health_timeout: 0}\n", "peers.p.health_timeout"),
])
def test_bad_peers_are_config_errors_naming_the_path(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        config(text)


def test_keys_come_from_the_environment_and_a_missing_one_is_an_error() -> None:
    cfg = config("peers:\n  a: {url: 'http://h', api_key_env: A_KEY}\n  b: {url: 'http://g'}\n")
    assert peer_keys(cfg, {"A_KEY": " sk-a "}) == {"a": "sk-a", "b": ""}
    with pytest.raises(ConfigError, match=r"peers\.a\.api_key_env: \$A_KEY is not set"):
        peer_keys(cfg, {})


# --- the routing rule ---------------------------------------------------------------------------

def _views(*peers: tuple[str, str, set[str]]) -> list[PeerView]:
    return [PeerView(name, state, frozenset(models)) for name, state, models in peers]  # type: ignore[arg-type]


@pytest.mark.parametrize(("local", "peers", "kind", "peer"), [
    # a local model is preferred over any peer
    (True, [("a", "up", {"m"})], "local", None),
    # the first peer in config order that is up
    (False, [("a", "up", {"m"}), ("b", "up", {"m"})], "peer", "a"),
    # failover: the first is down, the second takes it
    (False, [("a", "down", {"m"}), ("b", "up", {"m"})], "peer", "b"),
    # an up peer before one not checked yet, which is tried before a down one
    (False, [("a", "unknown", {"m"}), ("b", "up", {"m"})], "peer", "b"),
    (False, [("a", "down", {"m"}), ("b", "unknown", {"m"})], "peer", "b"),
    # only down peers offer it: 503
    (False, [("a", "down", {"m"}), ("b", "up", {"x"})], "down", None),
    # nobody offers it: 404
    (False, [("a", "up", {"x"})], "unknown", None),
])
def test_choose_route(local: bool, peers: list[tuple[str, str, set[str]]], kind: str,
                      peer: str | None) -> None:
    route = choose_route("m", local, _views(*peers))
    assert (route.kind, route.peer) == (kind, peer)


def test_listed_models_skips_what_another_lalo_takes_from_its_own_peers() -> None:
    payload = {"object": "list", "data": [
        {"id": "a", "owned_by": "lalo"}, {"id": "a-alias", "owned_by": "lalo", "parent": "a"},
        {"id": "b", "owned_by": "peer:gpu"}, {"id": "c", "owned_by": "vllm"}, {"id": "a"}]}
    assert listed_models(payload) == ("a", "a-alias", "c")
    with pytest.raises(ValueError, match="no 'data' list"):
        listed_models({"models": []})
    with pytest.raises(ValueError, match="without an 'id'"):
        listed_models({"data": [{"name": "x"}]})


# --- health checks ------------------------------------------------------------------------------

class FakePeer:
    """Answers GET /v1/models like a lalo peer, or fails as told; records the keys it saw."""

    def __init__(self, models: list[str]) -> None:
        self.models = models
        self.failing: Exception | None = None
        self.status = 200
        self.keys: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.keys.append(request.headers.get("authorization"))
        if self.failing is not None:
            raise self.failing
        assert request.url.path == "/v1/models"
        data = [{"id": m, "object": "model", "owned_by": "lalo"} for m in self.models]
        return httpx.Response(self.status, content=json.dumps({"object": "list", "data": data}))


def _table(fake: FakePeer, text: str, clock: list[float]) -> PeerTable:
    cfg = config(text)
    return PeerTable(cfg.peers, {"p": "sk-secret"}, transport=httpx.MockTransport(fake),
                     clock=lambda: clock[0])


def test_checks_mark_a_peer_up_and_down_and_auto_models_follow_its_list() -> None:
    async def run() -> None:
        fake = FakePeer(["m1"])
        clock = [100.0]
        table = _table(fake, "peers:\n  p: {url: 'http://h:8080', api_key_env: K, "
                             "max_failures: 3}\n", clock)
        assert table.route("m1", False).kind == "unknown"  # auto: nothing known yet
        assert await table.check("p") == "up"
        assert fake.keys == ["Bearer sk-secret"]
        assert table.offers("m1")
        endpoint = table.lease("m1", False)
        assert endpoint is not None
        assert (endpoint.host, endpoint.port, endpoint.api_key) == ("h", 8080, "sk-secret")
        assert table.lease("m1", True) is None  # a local copy is preferred

        fake.models = ["m1", "m2"]
        await table.check("p")
        assert table.model_names() == ["m1", "m2"]

        fake.failing = httpx.ConnectError("refused")
        assert await table.check("p") == "up"  # one failure is not enough
        assert await table.check("p") == "up"
        assert await table.check("p") == "down"
        table.peers["p"].next_check = 104.2
        with pytest.raises(PeerDownError, match=r"m2: served by peer\(s\) p") as caught:
            table.lease("m2", False)
        assert caught.value.retry_after == 5  # whole seconds to the next check
        # models learnt stay known while it is down: 503, not 404
        assert table.route("m2", False).kind == "down"
        [row] = table.status()
        assert row["state"] == "down" and row["failures"] == 3 and "refused" in row["last_error"]
        assert "sk-secret" not in json.dumps(table.status())

        fake.failing = None
        assert await table.check("p") == "up"  # one good check brings it back
        assert table.status()[0]["failures"] == 0
        await table.close()

    asyncio.run(run())


def test_wrong_key_and_not_a_model_list_fail_the_check() -> None:
    async def run() -> None:
        fake = FakePeer(["m"])
        table = _table(fake, "peers:\n  p: {url: 'http://h', max_failures: 1}\n", [0.0])
        fake.status = 401
        assert await table.check("p") == "down"
        assert "answered 401 (check its api_key_env)" in table.status()[0]["last_error"]
        fake.status = 200
        fake.failing = None
        assert await table.check("p") == "up"
        fake.status = 500
        assert await table.check("p") == "down"
        await table.close()

    asyncio.run(run())


def test_a_listed_peer_is_tried_before_its_first_check_and_names_what_it_lacks() -> None:
    async def run() -> None:
        fake = FakePeer(["a"])
        table = _table(fake, "peers:\n  p: {url: 'http://h', models: [a, b]}\n", [0.0])
        assert table.route("b", False).kind == "peer"  # unknown state: tried
        assert await table.check("p") == "up"
        assert table.status()[0]["last_error"] == "does not list b"
        await table.close()

    asyncio.run(run())


def test_a_refused_forward_marks_the_peer_down_at_once() -> None:
    async def run() -> None:
        fake = FakePeer(["m"])
        text = ("peers:\n  p: {url: 'http://h:1', max_failures: 3}\n"
                "  q: {url: 'http://g:2', max_failures: 3}\n")
        cfg = config(text)
        table = PeerTable(cfg.peers, {}, transport=httpx.MockTransport(fake))
        await table.check("p")
        await table.check("q")
        first = table.lease("m", False)
        assert first is not None and first.host == "h"
        assert table.unreachable(first, ConnectionRefusedError(), at_once=False) == "p"
        assert table.peers["p"].state == "up"  # a dropped connection: one failure only
        assert table.unreachable(first, ConnectionRefusedError()) == "p"
        second = table.lease("m", False)  # failover
        assert second is not None and second.host == "g"
        entries = table.model_entries(lambda name: False, 0)
        assert entries[0]["owned_by"] == "peer:q"
        assert entries[0]["lalo"] == {"remote": True, "peer": "q", "peers": ["p", "q"],
                                      "peer_state": "up"}
        assert table.model_entries(lambda name: True, 0) == []  # listed as local
        await table.close()

    asyncio.run(run())


def test_the_health_task_runs_until_closed() -> None:
    async def run() -> None:
        fake = FakePeer(["m"])
        cfg = config("peers:\n  p: {url: 'http://h', health_interval: 0.01}\n")
        enough = asyncio.Event()

        def answer(request: httpx.Request) -> httpx.Response:
            response = fake(request)
            if len(fake.keys) >= 3:
                enough.set()
            return response

        table = PeerTable(cfg.peers, {}, transport=httpx.MockTransport(answer))
        table.start()
        await asyncio.wait_for(enough.wait(), 10)  # checked again and again, every interval
        assert table.peers["p"].state == "up"
        tasks = list(table._tasks)
        await table.close()
        assert tasks and all(task.done() for task in tasks)

    asyncio.run(run())


def test_https_peers_get_a_tls_context_and_a_bad_ca_file_is_a_config_error(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    cfg = config("peers:\n  plain: {url: 'http://h'}\n  system: {url: 'https://h'}\n"
                 "  office: {url: 'https://g:8443', tls_ca_file: ca.pem}\n")
    table = PeerTable.from_config(cfg, {}, base_dir=tmp_path)
    peers = table.peers
    assert peers["plain"].tls is None and peers["plain"].port == 80
    assert peers["system"].tls is not None and peers["system"].port == 443
    assert peers["office"].tls is not None and peers["office"].port == 8443
    assert peers["office"].tls.verify_mode.name == "CERT_REQUIRED"
    bad = config("peers:\n  office: {url: 'https://g', tls_ca_file: junk.pem}\n")
    with pytest.raises(ConfigError, match=r"peers\.office\.tls_ca_file: .*junk\.pem: not a "
                                          r"readable PEM"):
        PeerTable.from_config(bad, {}, base_dir=tmp_path)
    missing = config("peers:\n  office: {url: 'https://g', tls_ca_file: nope.pem}\n")
    with pytest.raises(ConfigError, match=r"peers\.office\.tls_ca_file: .*nope\.pem"):
        PeerTable.from_config(missing, {}, base_dir=tmp_path)
