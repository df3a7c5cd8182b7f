"""Serving beyond loopback: refused without API keys unless `--insecure` (issue 16, item 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.errors import UsageError
from launcher.serve.exposure import check_exposure, is_loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "192.168.1.20",
                                  "no-such-host.invalid"])
def test_other_addresses(host: str) -> None:
    assert not is_loopback(host)


def test_a_non_loopback_host_needs_keys_or_insecure() -> None:
    with pytest.raises(UsageError, match=r"refusing to serve on 0\.0\.0\.0 without API keys") as caught:
        check_exposure("0.0.0.0", (), insecure=False)
    assert caught.value.exit_code == 2
    check_exposure("0.0.0.0", ("sk-1",), insecure=False)
    check_exposure("0.0.0.0", (), insecure=True)
    check_exposure("127.0.0.1", (), insecure=False)


def run_up(args: list[str], tmp_path: Path, config_text: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "lalo.yaml"
    config.write_text(config_text)
    env = {"LALO_STATE_DIR": str(tmp_path / "state"), "LALO_CONFIG_DIR": str(tmp_path / "cfg"),
           "LALO_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "launcher", "up", "--config", str(config),
                           *args], capture_output=True, text=True, env=env, timeout=60,
                          check=False)


@pytest.mark.parametrize(("args", "proxy"), [
    (["--host", "0.0.0.0"], ""),
    (["--host=0.0.0.0", "--detach"], ""),
    (["--port", "9"], "proxy: {host: 0.0.0.0}\n"),  # the config's host counts too
])
def test_lalo_up_refuses_before_starting_anything(tmp_path: Path, small_model: Path,
                                                  args: list[str], proxy: str) -> None:
    done = run_up(args, tmp_path, f"{proxy}models:\n  m:\n    file: {small_model}\n")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("lalo: error: refusing to serve on 0.0.0.0 without API keys")
    assert "--insecure" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "state" / "instance.json").exists()
