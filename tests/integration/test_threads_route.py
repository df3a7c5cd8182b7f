"""lalo's llama.cpp patch 0002 (GET/POST /threads) on a real llama-server with SmolLM2, started
as lalo starts it: the route reports and changes the thread counts, behind the API key; they
hold across the server's own sleep; decode follows the setting; a stream that spans changes is
complete and the same text; the router forwards the route to the model named."""

from __future__ import annotations

import json
import statistics
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from launcher.engines.base import ServerSettings
from launcher.engines.llama_server import LlamaServerEngine
from tests.support.lalo import free_port, wait_until
from tests.support.llama_server import KEY, Server, running, skip_unless_patched

pytestmark = pytest.mark.integration

PATCH = "0002-server-set-threads-route.patch"
PROMPT = "The history of the bicycle begins in"
# CPUs the rest of the machine may use while the decode speeds are compared
QUIET = 0.25


@contextmanager
def served(binary: Path, model: Path, log: Path, sleep_after: int = 0) -> Iterator[Server]:
    """`model` on llama-server started by lalo's own launch spec (the key in its environment),
    with `--threads 2`."""
    spec = LlamaServerEngine(binary).launch_spec(ServerSettings(
        model_path=model, host="127.0.0.1", port=free_port(), api_key=KEY, ctx_size=1024,
        parallel=1, threads=2, sleep_after=sleep_after))
    with running(list(spec.argv), dict(spec.env), spec.base_url, log) as started:
        yield started


@pytest.fixture
def server(llama_server_bin: Path, smollm2: Path, tmp_path: Path) -> Iterator[Server]:
    skip_unless_patched(llama_server_bin, PATCH)
    with served(llama_server_bin, smollm2, tmp_path / "llama-server.log") as started:
        yield started


def set_threads(client: httpx.Client, **counts: int) -> dict[str, Any]:
    answer = client.post("/threads", json=counts)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def completion(client: httpx.Client, n_predict: int) -> dict[str, Any]:
    answer = client.post("/completion", json={
        "prompt": PROMPT, "n_predict": n_predict, "temperature": 0, "ignore_eos": True,
        "cache_prompt": False})
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_get_reports_and_post_changes_the_counts(server: Server) -> None:
    with server.client() as client:
        # what the server was started with: --threads 2, and the batch count follows it
        assert client.get("/threads").json() == {"n_threads": 2, "n_threads_batch": 2}
        # a field left out stays as it is; the answer is what is now in force
        assert set_threads(client, n_threads=1) == {"n_threads": 1, "n_threads_batch": 2}
        assert client.get("/threads").json() == {"n_threads": 1, "n_threads_batch": 2}
        assert set_threads(client, n_threads_batch=1) == {"n_threads": 1, "n_threads_batch": 1}
        assert set_threads(client) == {"n_threads": 1, "n_threads_batch": 1}
        assert set_threads(client, n_threads=3, n_threads_batch=2) == \
            {"n_threads": 3, "n_threads_batch": 2}
        # more threads than the server started with (new threadpools): it still answers right
        assert "Paris" in client.post("/completion", json={
            "prompt": "The capital of France is", "n_predict": 8, "temperature": 0}).json()["content"]

        for bad, name in (({"n_threads": 0}, "n_threads"), ({"n_threads": -1}, "n_threads"),
                          ({"n_threads": 513}, "n_threads"), ({"n_threads": "2"}, "n_threads"),
                          ({"n_threads": 1.5}, "n_threads"), ({"n_threads": True}, "n_threads"),
                          ({"n_threads_batch": 1000}, "n_threads_batch"),
                          ({"n_threads": 2, "n_threads_batch": 0}, "n_threads_batch")):
            answer = client.post("/threads", json=bad)
            assert answer.status_code == 400, (bad, answer.text)
            assert answer.json()["error"]["message"] == f'"{name}" must be an integer from 1 to 512'
        for body in (b"[1, 2]", b"not json", b""):
            answer = client.post("/threads", content=body,
                                 headers={"Content-Type": "application/json"})
            assert answer.status_code == 400, (body, answer.text)
            assert answer.json()["error"]["message"] == "Request body must be a JSON object"
        # nothing bad changed anything
        assert client.get("/threads").json() == {"n_threads": 3, "n_threads_batch": 2}

    # behind --api-key like the other API routes (only /health is public)
    for key in (None, "wrong-key"):
        with server.client(key) as stranger:
            assert stranger.get("/threads").status_code == 401
            assert stranger.post("/threads", json={"n_threads": 1}).status_code == 401
            assert stranger.get("/health").status_code == 200
    with server.client() as client:
        assert client.get("/threads").json() == {"n_threads": 3, "n_threads_batch": 2}
    assert "set n_threads = 3, n_threads_batch = 2" in server.log.read_text(errors="replace")


def test_the_counts_hold_after_the_server_sleeps(llama_server_bin: Path, smollm2: Path,
                                                 tmp_path: Path) -> None:
    """llama-server's own sleep (lalo's `sleep_after`) frees the model and loads it again on
    the next request: with the counts set before, not those it started with."""
    skip_unless_patched(llama_server_bin, PATCH)
    log = tmp_path / "llama-server.log"
    with served(llama_server_bin, smollm2, log, sleep_after=1) as sleepy, sleepy.client() as client:
        assert set_threads(client, n_threads=1, n_threads_batch=1) == \
            {"n_threads": 1, "n_threads_batch": 1}
        wait_until(lambda: client.get("/props").json()["is_sleeping"], timeout=30,
                   message="the server to sleep")
        assert client.get("/threads").json() == {"n_threads": 1, "n_threads_batch": 1}
        assert not client.get("/props").json()["is_sleeping"]
        assert "Paris" in client.post("/completion", json={
            "prompt": "The capital of France is", "n_predict": 8, "temperature": 0}).json()["content"]
    text = log.read_text(errors="replace")
    woke = text.index("exiting sleeping state")
    assert "llama threadpool init, n_threads = 1" in text[woke:], text[woke:][:3000]


@dataclass
class Decode:
    speed: float  # tokens/s, as the server timed its decode
    computing: int  # the server's threads that did a share of the work
    cpus: float  # CPUs the server used over the request
    others: float  # CPUs the rest of the machine used meanwhile (this test's client aside)


def _decode(client: httpx.Client, server: psutil.Process, n_predict: int) -> Decode:
    me = psutil.Process()
    before = (time.monotonic(), psutil.cpu_times(), _per_thread(server), _busy(me))
    timings = completion(client, n_predict)["timings"]
    after = (time.monotonic(), psutil.cpu_times(), _per_thread(server), _busy(me))
    assert timings["predicted_n"] == n_predict
    wall = after[0] - before[0]
    machine = _machine_busy(after[1]) - _machine_busy(before[1])
    per_thread = {tid: cpu - before[2].get(tid, 0.0) for tid, cpu in after[2].items()}
    used, mine = sum(per_thread.values()), after[3] - before[3]
    # a compute thread does about an equal share; the HTTP and queue threads a sliver
    computing = sum(cpu > 0.25 * max(per_thread.values()) for cpu in per_thread.values())
    return Decode(float(timings["predicted_per_second"]), computing, used / wall,
                  max(0.0, machine - used - mine) / wall)


def _per_thread(process: psutil.Process) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in process.threads()}


def _busy(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _machine_busy(times: Any) -> float:
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


@pytest.mark.timeout(600)  # two spinning threads on a busy machine decode at 1-10 tokens/s
def test_decode_speed_follows_the_setting(server: Server, record_property: Any) -> None:
    """threads 1 and 2 in turns, 5 rounds of 64 tokens on this 2-CPU machine: how many of the
    server's threads did compute work (the setting, whatever else runs), the server's own decode
    tok/s and the CPU time it used. Two threads decode faster when the machine is otherwise
    idle; when another process keeps a CPU busy, two spinning threads decode far slower than one
    (0.1-0.7x here): that is why lalo wants to change the count, and why the direction is
    asserted only on a quiet machine."""
    process = psutil.Process(server.proc.pid)
    runs: dict[int, list[Decode]] = {1: [], 2: []}
    with server.client() as client:
        completion(client, 16)  # warm up
        for _ in range(5):
            for threads in (1, 2):
                # the prompt too: its batch would otherwise keep a second thread at work
                assert set_threads(client, n_threads=threads, n_threads_batch=threads) == \
                    {"n_threads": threads, "n_threads_batch": threads}
                runs[threads].append(_decode(client, process, 64))
    speed = {n: statistics.median(r.speed for r in runs[n]) for n in runs}
    cpus = {n: statistics.median(r.cpus for r in runs[n]) for n in runs}
    others = max(r.others for n in runs for r in runs[n])
    record_property("decode", {n: [vars(r) for r in runs[n]] for n in runs})
    figures = (f"decode tok/s, median of 5: threads 1 {speed[1]:.1f}, threads 2 {speed[2]:.1f} "
               f"({speed[2] / speed[1]:.2f}x); CPUs used {cpus[1]:.2f} and {cpus[2]:.2f}; "
               f"the rest of the machine used up to {others:.2f} CPUs")
    print(figures)
    assert {n: [r.computing for r in runs[n]] for n in runs} == {1: [1] * 5, 2: [2] * 5}, runs
    assert cpus[1] < 1.3, figures  # one compute thread (and the HTTP thread's little)
    if others < QUIET:
        assert cpus[2] > 1.5 and speed[2] > 1.15 * speed[1], figures
    else:
        warnings.warn(f"machine busy, direction not checked: {figures}", stacklevel=1)


def test_a_stream_that_spans_changes_is_complete_and_the_same(server: Server) -> None:
    with server.client() as client:
        expected = completion(client, 64)["content"]
        assert len(expected) > 100

        # (tokens the client had when the change was answered, the answer)
        changed: list[tuple[int, dict[str, Any]]] = []
        read_back: list[dict[str, Any]] = []
        seen = [0]

        def change(at: int, threads: int) -> None:
            wait_until(lambda: seen[0] >= at, timeout=60, interval=0.001,
                       message=f"{at} streamed tokens")
            with server.client() as other:
                answer = set_threads(other, n_threads=threads)
                changed.append((seen[0], answer))
                read_back.append(other.get("/threads").json())  # read while the stream decodes

        def changes() -> None:
            change(4, 1)
            change(24, 2)

        changer = threading.Thread(target=changes)
        pieces: list[str] = []
        last: dict[str, Any] = {}
        changer.start()
        try:
            with client.stream("POST", "/completion", json={
                    "prompt": PROMPT, "n_predict": 64, "temperature": 0, "ignore_eos": True,
                    "cache_prompt": False, "stream": True}) as stream:
                assert stream.status_code == 200
                for line in stream.iter_lines():
                    if line.startswith("data: "):
                        last = json.loads(line[len("data: "):])
                        pieces.append(last["content"])
                        seen[0] += 1
        finally:
            changer.join(60)
    assert [answer["n_threads"] for _, answer in changed] == [1, 2]
    assert read_back == [answer for _, answer in changed]
    # each change was made between two decodes of the stream, not after it: the stream still
    # had tokens to send when the change was answered
    assert all(at < 60 for at, _ in changed), changed
    assert last["stop"] is True and last["timings"]["predicted_n"] == 64
    assert "".join(pieces) == expected


def test_the_router_forwards_to_the_model_named(llama_server_bin: Path, smollm2: Path,
                                                tmp_path: Path) -> None:
    """Router mode (no -m): the routes go to the server of the `model` named, as /slots do."""
    skip_unless_patched(llama_server_bin, PATCH)
    models = tmp_path / "models"
    models.mkdir()
    (models / "smol.gguf").symlink_to(smollm2)
    port = free_port()
    argv = [str(llama_server_bin), "--models-dir", str(models), "--host", "127.0.0.1",
            "--port", str(port), "--threads", "2", "--ctx-size", "1024"]
    with running(argv, {"LLAMA_API_KEY": KEY}, f"http://127.0.0.1:{port}",
                 tmp_path / "router.log") as router:
        # a connection per request: this router's proxied answers say `Connection: close` and
        # `Keep-Alive` at once, and a request on a reused connection was at times dropped
        # unanswered (about 1 in 12 on a busy machine, /slots and /lora-adapters as well)
        with router.client(keepalive=False) as client:
            # the model loads on its first request, then answers for itself
            answer = client.get("/threads", params={"model": "smol"})
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"n_threads": 2, "n_threads_batch": 2}
            answer = client.post("/threads", json={"model": "smol", "n_threads": 1})
            assert answer.json() == {"n_threads": 1, "n_threads_batch": 2}, answer.text
            assert client.get("/threads", params={"model": "smol"}).json()["n_threads"] == 1
            # the router has no counts of its own: a model must be named, and exist
            for answer in (client.get("/threads"), client.post("/threads", json={"n_threads": 1}),
                           client.get("/threads", params={"model": "nope"})):
                assert answer.status_code == 400, answer.text
        with router.client(None, keepalive=False) as stranger:
            assert stranger.get("/threads", params={"model": "smol"}).status_code == 401
