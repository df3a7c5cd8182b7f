"""The thread governor on real servers: two models of lalo's engine with `threads: auto` get
their threads from what is busy (one busy alone: every CPU; both busy: a share each), their
answers stay whole and right across the changes, and a llama-server lalo did not build keeps
the static policy."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from launcher.placement.cpu_share import cpu_share, usable_cpus
from tests.support.lalo import LaloUp, lalo_env, wait_until, write_config

pytestmark = pytest.mark.integration
ASK = [{"role": "system", "content": "You are a helpful assistant."},
       {"role": "user", "content": "What is the capital of France?"}]


def threads(up: LaloUp) -> dict[str, Any]:
    return {m["name"]: (m["thread_policy"], m["threads"]) for m in up.status()["models"]}


def split(up: LaloUp) -> tuple[int, dict[str, int], list[str]]:
    """From one /api/status: the CPUs free of other programs (other workers on this machine
    count as busy CPUs, so this is what the governor shares), each model's threads, the busy."""
    status = up.status()
    share = status["cpu"]["threads"]
    return (share["cpus"] - share["others_busy"],
            {m["name"]: m["threads"] for m in status["models"]}, share["busy"])


def stream(up: LaloUp, model: str, out: dict[str, str], tokens: int = 400) -> threading.Thread:
    """A streamed answer in the background, kept whole in `out[model]`."""
    def run() -> None:
        text = []
        with httpx.stream("POST", up.url + "/v1/chat/completions", timeout=300, json={
                "model": model, "stream": True, "temperature": 0, "max_tokens": tokens,
                "ignore_eos": True, "messages": ASK}) as answer:
            for line in answer.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                    text.append(delta or "")
        out[model] = "".join(text)
    worker = threading.Thread(target=run)
    worker.start()
    return worker


def test_threads_follow_what_is_busy(llama_server_bin: Path, smollm2: Path, tmp_path: Path) -> None:
    if usable_cpus() < 2:
        pytest.skip("sharing needs at least 2 CPUs")
    config = write_config(tmp_path / "lalo.yaml", {
        "a": {"file": str(smollm2), "ctx_size": 1024},
        "b": {"file": str(smollm2), "ctx_size": 1024},
    }, engines={"llama_server": {"path": str(llama_server_bin)}})
    with LaloUp(config, lalo_env(tmp_path / "state", tmp_path / "config")) as up:
        up.wait_state("a", "ready")
        up.wait_state("b", "ready")
        assert "cpu: threads from what is busy for a, b" in up.output()
        assert all(policy == "governed" for policy, _ in threads(up).values())

        def alone(name: str, other: str) -> bool:
            free, counts, busy = split(up)
            return busy == [name] and counts[name] == free and counts[other] == max(1, free // 2)

        # nothing busy: either may take every CPU that is free
        wait_until(lambda: (s := split(up)) and not s[2] and set(s[1].values()) == {s[0]}, 20,
                   message="every free CPU for idle servers")
        answers: dict[str, str] = {}
        first = stream(up, "a", answers)
        wait_until(lambda: alone("a", "b"), 30, message="a alone busy: all; b ready to share")

        def both() -> bool:
            free, counts, busy = split(up)
            return sorted(busy) == ["a", "b"] and counts["a"] + counts["b"] <= max(free, 2) \
                and min(counts["a"], counts["b"]) >= max(1, free // 2)
        second = stream(up, "b", answers)
        wait_until(both, 30, message="both busy: a share each")
        first.join(300)
        wait_until(lambda: alone("b", "a") or not second.is_alive(), 30,
                   message="b alone after a finished and the settle time")
        second.join(300)
        # the answers were whole and right across the changes
        for name in ("a", "b"):
            assert "Paris" in answers[name], answers[name]
        metrics = httpx.get(up.url + "/metrics", timeout=10).text
        assert 'lalo_model_threads{model="a"}' in metrics


def test_a_llama_server_lalo_did_not_build_keeps_the_static_policy(
        llama_server_bin: Path, smollm2: Path, tmp_path: Path) -> None:
    own = tmp_path / "own" / "llama-server"  # the same binary, without lalo's manifest beside it
    own.parent.mkdir()
    shutil.copy2(llama_server_bin, own)
    os.chmod(own, 0o755)
    config = write_config(tmp_path / "lalo.yaml", {
        "a": {"file": str(smollm2), "ctx_size": 1024},
        "b": {"file": str(smollm2), "ctx_size": 1024},
        # a wait policy the user gave is never overridden
        "c": {"file": str(smollm2), "ctx_size": 1024, "env": {"OMP_WAIT_POLICY": "ACTIVE"}},
    }, engines={"llama_server": {"path": str(own)}})
    with LaloUp(config, lalo_env(tmp_path / "state", tmp_path / "config")) as up:
        for name in "abc":
            up.wait_state(name, "ready")
        assert {name: policy for name, (policy, _) in threads(up).items()} == \
            {"a": "static", "b": "static", "c": "static"}
        assert "threads from what is busy" not in up.output()
        # three servers with a thread per physical core each cannot all run at once here:
        # their OpenMP threads are told to spin briefly, then sleep, while they wait
        assert cpu_share([None, None, None]).oversubscribed
        pids = {m["name"]: m["pid"] for m in up.status()["models"]}
        waits = {name: (psutil.Process(pid).environ().get("OMP_WAIT_POLICY"),
                        psutil.Process(pid).environ().get("GOMP_SPINCOUNT"))
                 for name, pid in pids.items()}
        assert waits == {"a": ("PASSIVE", "300"), "b": ("PASSIVE", "300"), "c": ("ACTIVE", None)}
