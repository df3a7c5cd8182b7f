"""Out of memory, named and learned: the real llama-server killed with SIGKILL from outside
mid-request (as the kernel's OOM killer does) is reported as a kill for memory with the RSS
it had reached, to the client, in the logs and /api/status; its need rises to that figure,
and under a budget that no longer holds it, it is not restarted (no loop)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.lalo import FAST_SUPERVISOR, LaloUp, lalo_env, wait_until, write_config

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(sys.platform != "linux", reason="signals and /proc are Linux's")]

MIB = 1024**2
KILLED = re.compile(r"killed, most likely for memory: it had reached ([0-9.]+) MiB")


def _config(tmp_path: Path, smollm2: Path, llama_server_bin: Path, budget: int | str) -> Path:
    return write_config(
        tmp_path / "lalo.yaml", {"smol": {"file": str(smollm2), "ctx_size": 2048}},
        resources={"ram_budget": budget}, supervisor=FAST_SUPERVISOR,
        engines={"llama_server": {"path": str(llama_server_bin)}})


def test_a_server_killed_from_outside_mid_request_is_named_learned_and_not_looped(
    tmp_path: Path, llama_server_bin: Path, smollm2: Path
) -> None:
    config = _config(tmp_path, smollm2, llama_server_bin, "auto")
    env = lalo_env(tmp_path / "state", tmp_path / "config")
    with LaloUp(config, env) as up:
        ready = up.wait_state("smol", "ready", timeout=120)
        measured = wait_until(lambda: up.model("smol")["ram_measured"], 30,
                              message="a first RSS sample")
        # a budget that held the estimate at the start but cannot hold what it now needs
        _config(tmp_path, smollm2, llama_server_bin, measured - 16 * MIB)
        assert httpx.post(up.url + "/api/reload", timeout=60).status_code == 200
        events = []
        with httpx.stream("POST", up.url + "/v1/chat/completions", timeout=60, json={
                "model": "smol", "stream": True, "max_tokens": 4000,
                "messages": [{"role": "user", "content": "Tell me a very long story."}]}) as reply:
            assert reply.status_code == 200
            for line in reply.iter_lines():
                events.append(line)
                if len(events) == 3:  # mid-answer: the kernel (here: we) kill it
                    os.kill(ready["pid"], signal.SIGKILL)
        error = json.loads(next(e for e in reversed(events) if e.startswith("data: {"))[6:])
        message = error["error"]["message"]
        found = KILLED.search(message)
        assert found, message  # the client hears why, with the figure
        reached = float(found.group(1)) * MIB
        row = wait_until(lambda: "not restarted" in ((m := up.model("smol"))["last_error"] or "")
                         and m, 30, message="the restart to be given up")
        assert row["state"] == "failed", row
        assert KILLED.search(row["last_exit"]) and found.group(0) in row["last_error"], row
        assert row["ram_measured"] >= reached * 0.99, row  # its need rose to what it reached
        assert abs(row["memory_reached"] - reached) < MIB, row
        assert row["loads"] == 1 and not [c for c in up.children()
                                           if "llama-server" in c.name()], row  # no loop
        assert found.group(0) in up.output()  # lalo's own log
        logs = httpx.get(up.url + "/api/models/smol/logs", timeout=10).json()["lines"]
        assert any(found.group(0) in line for line in logs), logs[-10:]
        # a request now is refused at once, with the figures
        again = httpx.post(up.url + "/v1/chat/completions", timeout=60, json={
            "model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert again.status_code == 503 and found.group(0) in again.text, again.text
        assert "cannot hold it" in again.text, again.text
        print(f"\nclient: {message}\nstatus: {row['last_error'].splitlines()[0]}")
