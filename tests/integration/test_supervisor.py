"""The supervisor with real llama-server children, driven through the real `lalo up` process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.lalo import FAST_SUPERVISOR, LaloUp, free_port, wait_until, write_config

pytestmark = pytest.mark.integration


def engines(server: Path) -> dict[str, object]:
    return {"llama_server": {"path": str(server)}}


def config_of(tmp_path: Path, server: Path, models: dict[str, dict[str, object]],
              **sections: object) -> Path:
    return write_config(tmp_path / "lalo.yaml", models, engines=engines(server),
                        supervisor=FAST_SUPERVISOR, **sections)


def server_pids(up: LaloUp) -> dict[str, int]:
    return {m["name"]: m["pid"] for m in up.status()["models"] if m["pid"]}


def test_three_models_ready_and_answering(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
    small_model: Path, small_model_b: Path, small_model_c: Path,
) -> None:
    config = config_of(tmp_path, llama_server_bin, {
        "a": {"file": str(small_model), "ctx_size": 512},
        "b": {"file": str(small_model_b), "ctx_size": 512, "aliases": ["bee"]},
        # a wait policy the user gave is never overridden
        "c": {"file": str(small_model_c), "ctx_size": 512, "env": {"OMP_WAIT_POLICY": "ACTIVE"}},
    })
    with LaloUp(config, isolated) as up:
        for name in "abc":
            up.wait_state(name, "ready")
        pids = server_pids(up)
        assert len(set(pids.values())) == 3
        # lalo's engine: the governor sets each server's threads from what is busy, never more
        # than the CPUs, so OpenMP keeps its default spin (the static policy, for engines
        # lalo did not build, is tested in test_thread_governor.py)
        assert {m["name"]: m["thread_policy"] for m in up.status()["models"]} == \
            {"a": "governed", "b": "governed", "c": "governed"}
        waits = {name: (psutil.Process(pid).environ().get("OMP_WAIT_POLICY"),
                        psutil.Process(pid).environ().get("GOMP_SPINCOUNT"))
                 for name, pid in pids.items()}
        assert waits == {"a": (None, None), "b": (None, None), "c": ("ACTIVE", None)}
        for name, pid in pids.items():
            model = up.model(name)
            assert model["rss"] > 0 and model["ram_estimate"] > 0
            # model servers listen on loopback only and want the per-start key
            listening = {c.laddr for c in psutil.Process(pid).net_connections()
                         if c.status == psutil.CONN_LISTEN}
            assert all(addr.ip == "127.0.0.1" for addr in listening)
            port = model["port"]
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                                json={"prompt": "x", "max_tokens": 1})
            assert answer.status_code == 401
        # the key is not on the world-readable command line
        assert not any("--api-key" in part for part in psutil.Process(pids["a"]).cmdline())
        reply = httpx.post(up.url + "/v1/completions",
                           json={"model": "bee", "prompt": "hello", "max_tokens": 4}, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "b"


def test_kill_9_child_comes_back_and_counts_a_restart(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
    small_model: Path, small_model_b: Path,
) -> None:
    config = config_of(tmp_path, llama_server_bin, {
        "a": {"file": str(small_model), "ctx_size": 512},
        "b": {"file": str(small_model_b), "ctx_size": 512},
    })
    with LaloUp(config, isolated) as up:
        up.wait_state("a", "ready")
        up.wait_state("b", "ready")
        before = server_pids(up)
        os.kill(before["a"], signal.SIGKILL)
        # not leasable from the moment it died: a request then waits for the restart
        # (main: READY for up to 2 s more, and such a request got 502 "unreachable")
        wait_until(lambda: up.model("a")["state"] != "ready", 10, message="a to leave ready")
        reply = httpx.post(up.url + "/v1/completions", timeout=60,
                           json={"model": "a", "prompt": "x", "max_tokens": 2})
        assert reply.status_code == 200, reply.text
        model = wait_until(lambda: (m := up.model("a"))["state"] == "ready"
                           and m["pid"] != before["a"] and m, 30, message="a to come back")
        assert model["restarts"] == 1
        assert "SIGKILL" in model["last_error"]
        assert up.model("b")["pid"] == before["b"]  # the other model was not touched
        assert up.model("b")["restarts"] == 0


def test_corrupt_model_fails_with_a_reason_without_a_crash_loop(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
    small_model: Path, corrupt_model: Path,
) -> None:
    # a header lalo accepts, but a tensor llama-server cannot find: it exits at load
    renamed = tmp_path / "renamed-tensor.gguf"
    renamed.write_bytes(small_model.read_bytes().replace(b"blk.0.ffn_up.weight",
                                                         b"blk.0.ffn_XX.weight", 1))
    config = config_of(tmp_path, llama_server_bin, {
        "good": {"file": str(small_model), "ctx_size": 512},
        "truncated": {"file": str(corrupt_model), "ctx_size": 512},
        "bad-tensor": {"file": str(renamed), "ctx_size": 512},
    })
    with LaloUp(config, isolated) as up:
        up.wait_state("good", "ready")
        truncated = up.wait_state("truncated", "failed")
        assert "truncated GGUF file" in truncated["last_error"]
        assert truncated["pid"] is None and truncated["restart_in_s"] is None
        # retried with backoff (0.5, 1 s) until max_failures=3, then failed for good
        bad = wait_until(lambda: (m := up.model("bad-tensor"))["state"] == "failed"
                         and m["restart_in_s"] is None and m, 30, message="bad-tensor given up")
        assert bad["failures"] == 3
        assert "exited while starting" in bad["last_error"]
        assert "ffn_up" in bad["last_error"]  # the server's own words, from its log
        log = (Path(isolated["LALO_STATE_DIR"]) / "logs" / "bad-tensor.log").read_text()
        assert log.count("--- lalo: starting:") == 3  # no storm: exactly max_failures attempts
        assert up.model("good")["state"] == "ready"
        # a request for it is refused at once with the reason
        reply = httpx.post(up.url + "/v1/completions",
                           json={"model": "bad-tensor", "prompt": "x", "max_tokens": 1})
        assert reply.status_code == 503
        assert "ffn_up" in reply.json()["error"]["message"]


def test_a_taken_port_is_retried_on_another(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, small_model: Path,
) -> None:
    import asyncio

    from launcher.engines.base import ServerSettings
    from launcher.engines.llama_server import LlamaServerEngine
    from launcher.supervisor.logs import ModelLog
    from launcher.supervisor.process import ManagedModel, ModelState

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    taken = blocker.getsockname()[1]
    ports = iter([taken, free_port()])

    async def scenario() -> None:
        model = ManagedModel(
            "m", LlamaServerEngine(llama_server_bin),
            ServerSettings(model_path=small_model, host="127.0.0.1", port=0, api_key="",
                           ctx_size=512, parallel=1, threads=None),
            ModelLog(tmp_path / "m.log"),
            port_allocator=lambda host: next(ports),
        )
        try:
            endpoint = await model.start()
            assert model.state == ModelState.READY
            assert not endpoint.base_url.endswith(f":{taken}")
            assert model.spawn_count == 2
        finally:
            await model.close()

    try:
        asyncio.run(scenario())
    finally:
        blocker.close()
    assert "was taken by another process" in (tmp_path / "m.log").read_text()


def test_sigstop_hang_is_detected_and_restarted(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, small_model: Path,
) -> None:
    config = config_of(tmp_path, llama_server_bin, {"a": {"file": str(small_model), "ctx_size": 512}})
    with LaloUp(config, isolated) as up:
        up.wait_state("a", "ready")
        pid = up.model("a")["pid"]
        os.kill(pid, signal.SIGSTOP)
        model = wait_until(lambda: (m := up.model("a"))["state"] == "ready"
                           and m["pid"] != pid and m, 30, message="hung server replaced")
        assert "hung" in model["last_error"]
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_kill_9_of_lalo_leaves_no_child_and_next_up_starts(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
    small_model: Path, small_model_b: Path,
) -> None:
    config = config_of(tmp_path, llama_server_bin, {
        "a": {"file": str(small_model), "ctx_size": 512},
        "b": {"file": str(small_model_b), "ctx_size": 512},
    })
    up = LaloUp(config, isolated).start()
    try:
        up.wait_state("a", "ready")
        up.wait_state("b", "ready")
        children = list(server_pids(up).values())
        up.signal(signal.SIGKILL)
        up.wait()
        wait_until(lambda: not any(_alive(pid) for pid in children), 2.0,
                   message="children gone within 2 s of kill -9")
    finally:
        up.stop()
    # the lock died with the process: a new instance starts at once
    with LaloUp(config, isolated) as again:
        again.wait_state("a", "ready")


def test_next_up_reaps_children_of_a_dead_instance_by_pid_and_create_time(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, small_model: Path,
) -> None:
    state = Path(isolated["LALO_STATE_DIR"])
    state.mkdir(parents=True)
    # an orphan we started ourselves (as if its lalo had died without PDEATHSIG), and a
    # record whose pid is alive but whose create time does not match: must not be touched
    orphan = subprocess.Popen([str(llama_server_bin), "-m", str(small_model), "--port",
                               str(free_port()), "-c", "512"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        records = {
            "owner": {"pid": 999999, "created": 1.0},
            "children": {
                "a": {"pid": orphan.pid, "created": psutil.Process(orphan.pid).create_time(),
                      "port": 1},
                "b": {"pid": bystander.pid, "created": 12345.0, "port": 2},
            },
        }
        (state / "children.json").write_text(json.dumps(records))
        config = config_of(tmp_path, llama_server_bin,
                           {"a": {"file": str(small_model), "ctx_size": 512}})
        with LaloUp(config, isolated) as up:
            wait_until(lambda: orphan.poll() is not None, 10, message="orphan reaped")
            assert bystander.poll() is None
            assert f"pids {orphan.pid}" in up.output()
    finally:
        for proc in (orphan, bystander):
            proc.kill()
            proc.wait()


def test_down_from_another_process_and_state_file(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, small_model: Path,
) -> None:
    config = config_of(tmp_path, llama_server_bin, {"a": {"file": str(small_model), "ctx_size": 512}})
    up = LaloUp(config, isolated).start()
    try:
        up.wait_state("a", "ready")
        child = up.model("a")["pid"]
        state_file = Path(isolated["LALO_STATE_DIR"]) / "instance.json"
        assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
        info = json.loads(state_file.read_text())
        assert info["url"] == up.url and info["pid"] == up.proc.pid and info["admin_token"]
        # without the admin token, shutting down is refused
        assert httpx.post(up.url + "/api/shutdown").status_code == 401
        result = subprocess.run([sys.executable, "-m", "launcher", "down"], env=isolated,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "lalo stopped" in result.stdout
        assert up.wait(10) == 0
        assert not _alive(child)
        assert not state_file.exists()
    finally:
        up.stop()
    result = subprocess.run([sys.executable, "-m", "launcher", "down"], env=isolated,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == "lalo: error: lalo is not running (start it with `lalo up`)"


def test_second_up_is_refused_naming_the_running_url(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, small_model: Path,
) -> None:
    config = config_of(tmp_path, llama_server_bin, {"a": {"file": str(small_model), "ctx_size": 512}})
    with LaloUp(config, isolated) as up:
        result = subprocess.run(
            [sys.executable, "-m", "launcher", "up", "--config", str(config), "--port",
             str(free_port())], env=isolated, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"lalo: error: lalo is already running at {up.url} (pid {up.proc.pid}); "
            "stop it with `lalo down`"
        )


def test_ctrl_c_stops_everything_and_exits_130(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, small_model: Path,
) -> None:
    config = config_of(tmp_path, llama_server_bin, {"a": {"file": str(small_model), "ctx_size": 512}})
    up = LaloUp(config, isolated).start()
    try:
        up.wait_state("a", "ready")
        child = up.model("a")["pid"]
        up.signal(signal.SIGINT)
        assert up.wait(30) == 130
        assert not _alive(child)
    finally:
        up.stop()


def test_proxy_port_in_use_is_one_clear_line_exit_3(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, small_model: Path,
) -> None:
    config = config_of(tmp_path, llama_server_bin, {"a": {"file": str(small_model), "ctx_size": 512}})
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "launcher", "up", "--config", str(config), "--port", str(port)],
            env=isolated, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stderr.strip().endswith(
        f"lalo: error: port {port} on 127.0.0.1 is already in use; stop what uses it or pass --port")


def test_detach_returns_once_answering_and_down_stops_it(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, small_model: Path,
) -> None:
    config = config_of(tmp_path, llama_server_bin, {"a": {"file": str(small_model), "ctx_size": 512}})
    port = free_port()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "up", "--config", str(config), "--port", str(port),
         "--detach"], env=isolated, capture_output=True, text=True, timeout=120)
    try:
        assert result.returncode == 0, result.stderr
        assert f"lalo is running at http://127.0.0.1:{port}" in result.stdout
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        assert time.monotonic() - started < 60
        status = subprocess.run([sys.executable, "-m", "launcher", "status", "--json"],
                                env=isolated, capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["models"][0]["name"] == "a"
    finally:
        down = subprocess.run([sys.executable, "-m", "launcher", "down"], env=isolated,
                              capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(900)  # 300 tokens: seconds here alone, minutes on a crowded machine
def test_ctrl_c_lets_a_stream_in_flight_finish_then_stops_the_servers(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, smollm2: Path,
) -> None:
    # main stopped the model servers while uvicorn still drained: the client got ~96 events,
    # then "the model server broke off the stream"
    config = write_config(tmp_path / "lalo.yaml",
                          {"smol": {"file": str(smollm2), "ctx_size": 1024, "threads": 1}},
                          engines=engines(llama_server_bin),
                          # long enough for 300 tokens on a busy shared 2-core machine
                          supervisor={**FAST_SUPERVISOR, "stop_timeout": 600})
    up = LaloUp(config, isolated).start()
    events: list[str] = []
    try:
        up.wait_state("smol", "ready")
        child = up.model("smol")["pid"]
        with httpx.stream("POST", up.url + "/v1/chat/completions", timeout=600, json={
            "model": "smol", "stream": True, "max_tokens": 300, "temperature": 0,
            "ignore_eos": True, "messages": [{"role": "user", "content": "Tell me a story."}],
        }) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    if len(events) == 5:
                        up.signal(signal.SIGINT)
        assert up.wait(60) == 130  # at once once the stream is done
        assert not _alive(child)
    finally:
        up.stop()
    assert events[-1] == "[DONE]", events[-3:]
    assert not any('"error"' in event for event in events)
    finished = [c["finish_reason"] for e in events[:-1] for c in json.loads(e).get("choices", [])
                if c.get("finish_reason")]
    assert finished == ["length"]  # all 300 tokens
    assert len(events) > 250
    assert "letting 1 request(s) in flight finish" in up.output()


def _completion(url: str, model: str, tokens: int = 8) -> int:
    try:
        return httpx.post(url + "/v1/completions", timeout=300, json={
            "model": model, "prompt": "Once upon a time", "max_tokens": tokens,
            "temperature": 0}).status_code
    except httpx.HTTPError as exc:
        raise AssertionError(f"{model}: {exc!r}") from exc


def _burst(url: str, names: list[str]) -> list[int]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(lambda name: _completion(url, name), names))


def test_mixed_traffic_over_two_real_models_with_max_loaded_1_waits_and_batches(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, smollm2: Path,
    gemma3: Path,
) -> None:
    # main: 8 answers and 8 x 503 "insufficient_memory" (blaming memory for max_loaded)
    config = config_of(tmp_path, llama_server_bin, {
        "smol": {"file": str(smollm2), "ctx_size": 1024},
        "gemma": {"file": str(gemma3), "ctx_size": 1024, "preload": False},
    }, resources={"max_loaded": 1})
    with LaloUp(config, isolated) as up:
        up.wait_state("smol", "ready")
        statuses = _burst(up.url, ["smol", "gemma"] * 8)
        assert statuses == [200] * 16
        models = {m["name"]: m for m in up.status()["models"]}
        swaps = sum(m["evictions"] for m in models.values())
        assert 1 <= swaps < 16, swaps
        assert models["smol"]["requests"] == 8 and models["gemma"]["requests"] == 8
        text = httpx.get(up.url + "/metrics").text
        assert "lalo_swaps_total{" in text and "lalo_queue_wait_seconds_bucket{" in text


def test_three_on_demand_models_with_max_loaded_2_answer_36_requests_at_once(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
    small_model: Path, small_model_b: Path, small_model_c: Path,
) -> None:
    # main: 12 answers and 24 refusals in 0.3 s
    config = config_of(tmp_path, llama_server_bin, {
        "a": {"file": str(small_model), "ctx_size": 512},
        "b": {"file": str(small_model_b), "ctx_size": 512, "preload": False},
        "c": {"file": str(small_model_c), "ctx_size": 512, "preload": False},
    }, resources={"max_loaded": 2})
    with LaloUp(config, isolated) as up:
        up.wait_state("a", "ready")
        statuses = _burst(up.url, ["a", "b", "c"] * 12)
        assert statuses == [200] * 36
        assert sum(m["evictions"] for m in up.status()["models"]) < 36


def test_a_catalog_model_that_cannot_be_pulled_is_failed_and_the_others_are_served(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, small_model: Path,
) -> None:
    # main: `lalo up` exited with "could not be pulled" and served neither model
    env = {**isolated, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    config = config_of(tmp_path, llama_server_bin, {
        "good": {"file": str(small_model), "ctx_size": 512},
        "missing": {"catalog": "phi-2", "ctx_size": 512},
    })
    with LaloUp(config, env) as up:
        up.wait_state("good", "ready")
        missing = up.wait_state("missing", "failed")
        assert "lalo models pull phi-2" in missing["last_error"]
        assert "missing: FAILED" in up.output() and "lalo models pull phi-2" in up.output()
        reply = httpx.post(up.url + "/v1/completions",
                           json={"model": "missing", "prompt": "x", "max_tokens": 1})
        assert reply.status_code == 503 and "lalo models pull phi-2" in reply.text
        ok = httpx.post(up.url + "/v1/completions", timeout=60,
                        json={"model": "good", "prompt": "x", "max_tokens": 1})
        assert ok.status_code == 200
    # nothing at all to serve: exit 3 with every reason
    alone = config_of(tmp_path, llama_server_bin, {"missing": {"catalog": "phi-2"}})
    done = subprocess.run([sys.executable, "-m", "launcher", "up", "--config", str(alone),
                           "--port", str(free_port())], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "no model can be served" in done.stderr and "lalo models pull phi-2" in done.stderr


def test_reload_restarts_only_what_changed_and_a_bad_file_changes_nothing(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
    small_model: Path, small_model_b: Path, small_model_c: Path,
) -> None:
    models: dict[str, dict[str, object]] = {
        "same": {"file": str(small_model), "ctx_size": 512},
        "changed": {"file": str(small_model_b), "ctx_size": 512},
        "gone": {"file": str(small_model_c), "ctx_size": 512},
    }
    config = config_of(tmp_path, llama_server_bin, models)
    with LaloUp(config, isolated) as up:
        for name in models:
            up.wait_state(name, "ready")
        before = server_pids(up)
        # a bad file: one line saying why, nothing changes
        config_of(tmp_path, llama_server_bin, {**models, "same": {**models["same"], "ctx_size": 1}})
        bad = subprocess.run([sys.executable, "-m", "launcher", "reload"], env=isolated,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0
        assert "models.same.ctx_size" in bad.stderr and "nothing changed" in bad.stderr
        assert server_pids(up) == before
        # changed settings, an added and a removed model, through SIGHUP
        config_of(tmp_path, llama_server_bin, {
            "same": models["same"],
            "changed": {**models["changed"], "ctx_size": 1024},
            "new": {"file": str(small_model_c), "ctx_size": 512},
        })
        up.signal(signal.SIGHUP)
        wait_until(lambda: {m["name"] for m in up.status()["models"]} == {"same", "changed", "new"},
                   30, message="the reloaded model list")
        changed = wait_until(lambda: (m := up.model("changed"))["state"] == "ready"
                             and m["pid"] != before["changed"] and m, 60, message="changed back")
        assert changed["pid"] != before["changed"]
        up.wait_state("new", "ready")
        assert up.model("same")["pid"] == before["same"]  # unchanged: not disturbed
        assert not _alive(before["gone"])
        assert not _alive(before["changed"])
        # the CLI, with nothing left to change
        again = subprocess.run([sys.executable, "-m", "launcher", "reload"], env=isolated,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        assert "no model changed" in again.stdout
        reply = httpx.post(up.url + "/v1/completions", timeout=60,
                           json={"model": "new", "prompt": "x", "max_tokens": 2})
        assert reply.status_code == 200


def test_a_second_ctrl_c_stops_at_once_without_waiting_for_requests(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, smollm2: Path,
) -> None:
    config = write_config(tmp_path / "lalo.yaml",
                          {"smol": {"file": str(smollm2), "ctx_size": 4096, "threads": 1}},
                          engines=engines(llama_server_bin),
                          supervisor={**FAST_SUPERVISOR, "stop_timeout": 600})
    up = LaloUp(config, isolated).start()
    events: list[str] = []
    try:
        up.wait_state("smol", "ready")
        with httpx.stream("POST", up.url + "/v1/completions", timeout=120, json={
            "model": "smol", "stream": True, "max_tokens": 4000, "ignore_eos": True,
            "prompt": "Once upon a time",
        }) as response:
            # the stream is cut (an error event, or the connection closes): that is the point
            with contextlib.suppress(httpx.HTTPError):
                for line in response.iter_lines():
                    events.append(line)
                    if len(events) == 3:
                        up.signal(signal.SIGINT)
                        wait_until(lambda: "letting 1 request(s)" in up.output(), 30,
                                   message="the first Ctrl+C to be seen")
                        began = time.monotonic()
                        up.signal(signal.SIGINT)
        assert up.wait(30) == 130
        assert time.monotonic() - began < 15  # llama-server alone waits 30 s on a live stream
    finally:
        up.stop()
    assert "data: [DONE]" not in events


def test_a_model_added_by_reload_has_its_log_at_once(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
    small_model: Path, small_model_b: Path,
) -> None:
    # main: its /logs/stream answered 404 "has no log file to follow" (the paths were read
    # once at `lalo up`) and /logs read the in-memory tail instead of the file
    first = {"a": {"file": str(small_model), "ctx_size": 512}}
    config = config_of(tmp_path, llama_server_bin, first)
    with LaloUp(config, isolated) as up:
        up.wait_state("a", "ready")
        config_of(tmp_path, llama_server_bin,
                  {**first, "new": {"file": str(small_model_b), "ctx_size": 512}})
        up.signal(signal.SIGHUP)
        up.wait_state("new", "ready")
        logs = httpx.get(up.url + "/api/models/new/logs?n=50", timeout=10)
        assert logs.status_code == 200, logs.text
        assert any("starting:" in line for line in logs.json()["lines"])
        with httpx.stream("GET", up.url + "/api/models/new/logs/stream?n=5",
                          timeout=10) as stream:
            assert stream.status_code == 200, stream.read()
            assert next(stream.iter_lines()).startswith(("data: ", ": following"))
