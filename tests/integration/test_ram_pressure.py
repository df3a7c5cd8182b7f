"""A good citizen when RAM runs short: the real `lalo up` with two idle SmolLM2 servers unloads
both when another process takes the machine's RAM under the reserve, refuses a load (503 with
the figures) after max_wait, and loads again once that process is gone.

The reserve is set relative to the RAM available now (the helper then only needs a few GiB, so
other work on the machine is not starved); the unit test with an injected available-memory
function (tests/unit/test_supervisor_races.py) is the main proof, this one the real thing."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.lalo import FAST_SUPERVISOR, LaloUp, lalo_env, wait_until, write_config

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(sys.platform != "linux", reason="reads the machine's RAM")]

GIB = 1024**3
MARGIN = 2 * GIB  # what stays above the reserve before the helper runs
HOG = MARGIN + 2 * GIB  # what the helper takes: under the reserve by 2 GiB, whatever else runs
HOG_SOURCE = """
import sys, time
block = bytearray(int(sys.argv[1]))
for i in range(0, len(block), 4096):  # touch every page: resident, not just reserved
    block[i] = 1
print("ready", flush=True)
time.sleep(600)
"""


def test_idle_models_unloaded_while_ram_is_short_and_loaded_again_after(
    tmp_path: Path, llama_server_bin: Path, smollm2: Path
) -> None:
    available = psutil.virtual_memory().available
    if available < HOG + 2 * GIB:
        pytest.skip(f"needs {(HOG + 2 * GIB) / GIB:.0f} GiB available; "
                    f"{available / GIB:.1f} GiB here")
    reserve = available - MARGIN
    config = write_config(
        tmp_path / "lalo.yaml",
        {name: {"file": str(smollm2), "ctx_size": 1024} for name in ("one", "two")},
        resources={"ram_budget": "auto", "ram_reserve": reserve, "max_wait": 2.0},
        supervisor=FAST_SUPERVISOR, engines={"llama_server": {"path": str(llama_server_bin)}})
    env = lalo_env(tmp_path / "state", tmp_path / "config")
    with LaloUp(config, env) as up:
        for name in ("one", "two"):
            up.wait_state(name, "ready", timeout=120)
        hog = subprocess.Popen([sys.executable, "-c", HOG_SOURCE, str(HOG)],
                               stdout=subprocess.PIPE, text=True)
        try:
            assert hog.stdout is not None and hog.stdout.readline().strip() == "ready"
            started = time.monotonic()
            # two checks of the once-a-second loop, one model per check, plus the stops
            wait_until(lambda: all(up.model(n)["state"] == "stopped" for n in ("one", "two")),
                       15, message="both idle models to be unloaded")
            print(f"\nboth unloaded {time.monotonic() - started:.1f} s after RAM went short")
            assert "RAM short: " in up.output() and "unloading idle one" in up.output()
            refused = httpx.post(up.url + "/v1/chat/completions", timeout=60, json={
                "model": "one", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4})
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["code"] == "insufficient_memory" and "MiB" in error["message"], error
            assert up.model("one")["loads"] == 1  # no load started into RAM that is not there
        finally:
            hog.kill()
            hog.wait()
        answered = httpx.post(up.url + "/v1/chat/completions", timeout=120, json={
            "model": "one", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert answered.status_code == 200, answered.text
        assert up.model("one")["loads"] == 2
        print(f"503 while short: {error['message']}")
