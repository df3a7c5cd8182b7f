"""Sleeping model servers: the config key, the flag, what /props says, and the `sleeping` state."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from launcher.config import parse_config
from launcher.engines.base import ServerSettings
from launcher.engines.llama_server import LlamaServerEngine
from launcher.errors import ConfigError
from launcher.supervisor import platform
from launcher.supervisor.events import SupervisorEvents
from launcher.supervisor.localhttp import LocalHttpError, request_json
from launcher.supervisor.process import ModelState
from launcher.supervisor.sleep import is_sleeping_in, props_sleeping
from launcher.supervisor.supervisor import SupervisedModel, Supervisor
from tests.unit.test_managed_model import Heard, make


def settings(tmp_path: Path, **changes: object) -> ServerSettings:
    base = ServerSettings(model_path=tmp_path / "m.gguf", host="127.0.0.1", port=1234,
                          api_key="k", ctx_size=512, parallel=1, threads=None)
    return ServerSettings(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def test_sleep_after_is_passed_only_when_set(tmp_path: Path) -> None:
    engine = LlamaServerEngine(tmp_path / "llama-server")
    argv = engine.launch_spec(settings(tmp_path, sleep_after=30)).argv
    assert argv[argv.index("--sleep-idle-seconds") + 1] == "30"
    assert "--sleep-idle-seconds" not in engine.launch_spec(settings(tmp_path)).argv
    slots = engine.launch_spec(settings(tmp_path, slot_save_path=tmp_path)).argv
    assert slots[slots.index("--slot-save-path") + 1] == str(tmp_path)


def test_lalo_s_engine_keeps_its_slots_across_a_sleep(tmp_path: Path) -> None:
    """Patch 0003's flag: only on lalo's engine, and only with both sleep and slot files."""
    patched = LlamaServerEngine.with_patches(
        tmp_path / "llama-server", ["0002-server-set-threads-route.patch",
                                    "0003-server-sleep-save-slots.patch"])
    assert patched.set_threads and patched.sleep_saves_slots
    both = settings(tmp_path, sleep_after=30, slot_save_path=tmp_path)
    assert "--sleep-save-slots" in patched.launch_spec(both).argv
    assert "--sleep-save-slots" not in patched.launch_spec(settings(tmp_path, sleep_after=30)).argv
    assert "--sleep-save-slots" not in patched.launch_spec(
        settings(tmp_path, slot_save_path=tmp_path)).argv
    plain = LlamaServerEngine.with_patches(tmp_path / "llama-server", [])
    assert not plain.set_threads and not plain.sleep_saves_slots
    assert "--sleep-save-slots" not in plain.launch_spec(both).argv  # a server without the patch


def test_sleep_after_config() -> None:
    config = parse_config("models:\n  a: {file: a.gguf, sleep_after: 300}\n", label="t")
    assert config.models["a"].sleep_after == 300
    assert parse_config("models:\n  a: {file: a.gguf}\n", label="t").models["a"].sleep_after == 0
    with pytest.raises(ConfigError, match=r"models\.a\.sleep_after"):
        parse_config("models:\n  a: {file: a.gguf, sleep_after: -1}\n", label="t")
    with pytest.raises(ConfigError, match="sleep_after needs engine llama-server"):
        parse_config("models:\n  a: {file: a.llamafile, sleep_after: 5}\n", label="t")
    with pytest.raises(ConfigError, match="prompt_cache needs engine llama-server"):
        parse_config("models:\n  a: {file: a.llamafile, prompt_cache: true}\n", label="t")
    # the default (on) is simply not used for other engines
    assert parse_config("models:\n  a: {file: a.llamafile}\n", label="t").models["a"].prompt_cache


def test_is_sleeping_in_props() -> None:
    assert is_sleeping_in({"is_sleeping": True, "total_slots": 1}) is True
    assert is_sleeping_in({"is_sleeping": False}) is False
    assert is_sleeping_in({"total_slots": 1}) is None  # an engine that does not say
    assert is_sleeping_in({"is_sleeping": "yes"}) is None
    assert is_sleeping_in(None) is None


async def _serve(answers: dict[str, tuple[int, bytes, bool]]) -> tuple[asyncio.Server, int]:
    """A small real HTTP server: path -> (status, body, chunked)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if length:
            await reader.readexactly(length)
        path = head.split()[1].decode()
        status, body, chunked = answers[path]
        if chunked:
            half = len(body) // 2
            payload = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n"
                               for p in (body[:half], body[half:]) if p) + b"0\r\n\r\n"
            writer.write(f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                         + payload)
        else:
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                         + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
async def props_server() -> AsyncIterator[str]:
    server, port = await _serve({
        "/asleep/props": (200, json.dumps({"is_sleeping": True}).encode(), True),
        "/awake/props": (200, json.dumps({"is_sleeping": False}).encode(), False),
        "/other/props": (404, b'{"error": {"message": "no"}}', False),
    })
    async with server:
        yield f"http://127.0.0.1:{port}"


async def test_props_sleeping_asks_the_server(props_server: str) -> None:
    assert await props_sleeping(props_server + "/asleep", "k", 2.0) is True
    assert await props_sleeping(props_server + "/awake", "", 2.0) is False
    assert await props_sleeping(props_server + "/other", "k", 2.0) is None
    answer = await request_json("GET", props_server + "/other/props", {}, 2.0)
    assert answer.status == 404 and answer.body == {"error": {"message": "no"}}


async def test_props_sleeping_is_none_when_nothing_answers() -> None:
    server, port = await _serve({})
    server.close()
    await server.wait_closed()
    assert await props_sleeping(f"http://127.0.0.1:{port}", "k", 1.0) is None
    with pytest.raises(LocalHttpError):
        await request_json("GET", f"http://127.0.0.1:{port}/x", {}, 1.0)


async def test_sleeping_is_reported_and_a_wake_is_ready_at_once(tmp_path: Path) -> None:
    said: list[bool | None] = [False]
    asked = [0]

    async def probe(base_url: str, api_key: str, within: float) -> bool | None:
        asked[0] += 1
        return said[0]

    async def polls(n: int) -> None:
        target = asked[0] + n
        await _until(lambda: asked[0] >= target)

    heard = Heard()
    seen = heard.states
    model = make(tmp_path, events=heard)
    model._sleep_probe = probe  # the constructor parameter, set after make() builds it
    try:
        endpoint = await model.ensure_ready()
        said[0] = True
        await _until(lambda: model.reported_state == ModelState.SLEEPING)
        assert ModelState.SLEEPING in seen
        # a sleeping model is ready to its owner and still hands out its endpoint: the
        # request wakes the server
        assert model.state == ModelState.READY
        assert (await model.ensure_ready()) == endpoint
        assert model.snapshot()["state"] == "sleeping"
        model.mark_awake()
        assert model.reported_state == ModelState.READY and model.rss is None
        # the server says "sleeping" while it reloads: not believed until it said "awake"
        await polls(3)
        assert model.reported_state == ModelState.READY
        said[0] = False
        await polls(2)
        said[0] = True
        await _until(lambda: model.reported_state == ModelState.SLEEPING)
        await model.stop("test")
        assert model.state == ModelState.STOPPED
    finally:
        await model.close()


async def _until(condition: object, limit: float = 10.0) -> None:
    assert callable(condition)
    deadline = asyncio.get_running_loop().time() + limit
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_sleeping_model_lends_its_freed_memory_and_wakes_through_admission(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sleeping model counts at its measured (small) RSS, so another model fits beside it;
    its wake is admitted like a load: the other model, idle, is evicted to make room, and the
    same process wakes (no restart). (Before, it kept its full size and was evicted.)"""
    mib = 1024**2
    asleep = {"flag": False}
    events = SupervisorEvents()
    sleepy = make(tmp_path / "a", name="a", events=events.for_model("a"))
    other = make(tmp_path / "b", name="b", events=events.for_model("b"))

    async def probe(base_url: str, api_key: str, within: float) -> bool | None:
        return asleep["flag"]

    sleepy._sleep_probe = probe
    # the real RSS of the stand-in servers says nothing about a model: give the figures
    monkeypatch.setattr(platform, "rss_of", lambda pid, children=False: (
        10 * mib if pid == sleepy.pid and asleep["flag"] else 60 * mib))
    meta = [SupervisedModel(name=n, aliases=(), engine="fake", estimate=60 * mib, preload=False,
                            ttl=0, path="") for n in ("a", "b")]
    sup = Supervisor([(meta[0], sleepy), (meta[1], other)], ram_budget=100 * mib, events=events,
                     measured={"a": 60 * mib, "b": 60 * mib})
    try:
        first = await sup.load("a")
        asleep["flag"] = True
        await _until(lambda: sleepy.reported_state == ModelState.SLEEPING
                     and sleepy.rss == 10 * mib)
        assert sup.status()[0]["state"] == "sleeping"
        await sup.load("b")  # 10 + 60 <= 100: b loads beside the sleeping a
        assert sleepy.asleep and other.state == ModelState.READY
        assert sup.record("a").evictions == 0
        asleep["flag"] = False
        async with sup.lease("a") as lease:  # a's wake needs 60: b (idle) goes
            endpoint = lease.endpoint
            assert endpoint.pid == first.pid == sleepy.pid
            assert other.state == ModelState.STOPPED
        assert sup.record("a").wakes == 1 and sup.record("b").evictions == 1
    finally:
        await sup.close()
