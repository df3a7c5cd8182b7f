"""lalo as a systemd service: the unit file, and install / uninstall / status through systemctl.

The unit runs `lalo up --config F` in the foreground. On stop systemd sends SIGTERM to lalo
alone (`KillMode=mixed`: the model servers are lalo's to stop after the requests in flight
drain; SIGKILL reaches the whole group only after `TimeoutStopSec`). `Restart=on-failure`
brings lalo back after a crash, not after `lalo down` or a clean stop.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher.config import find_config_file, load_config
from launcher.errors import LaloError, UsageError

UNIT_NAME = "lalo.service"
RESTART_DELAY = 5  # seconds between a crash and the restart
# after lalo's own stop_timeout (uvicorn's drain), lalo waits 5 s more, then up to 5 s for
# cancelled requests, then stop_timeout again per model server: all that, plus a margin
STOP_MARGIN = 20


class ServiceError(LaloError):
    pass


Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_systemctl(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


def lalo_command() -> list[str]:
    """How to start this very lalo from a unit: the frozen binary, or this Python with -m."""
    if getattr(sys, "frozen", False):
        return [str(Path(sys.executable).resolve())]
    return [str(Path(sys.executable).absolute()), "-m", "launcher"]


def quote(arg: str) -> str:
    """One argument for ExecStart (systemd's own quoting; `%` and `$` are specifiers)."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    if escaped and all(ch.isalnum() or ch in "/._-+=:,@" for ch in escaped):
        return escaped
    return f'"{escaped}"'


@dataclass(frozen=True)
class UnitSpec:
    command: list[str]  # lalo itself: an absolute path first
    config: Path
    stop_timeout: float
    user_unit: bool
    run_as: str | None = None  # User= of a system unit
    working_dir: Path | None = None

    def text(self) -> str:
        argv = [*self.command, "up", "--config", str(self.config)]
        lines = [
            "[Unit]",
            "Description=lalo: local llama.cpp models behind one OpenAI-compatible port",
            "After=network-online.target",
            "Wants=network-online.target",
            "",
            "[Service]",
            "Type=simple",
            f"ExecStart={' '.join(quote(arg) for arg in argv)}",
            # lalo drains on SIGTERM and then stops its model servers itself
            "KillSignal=SIGTERM",
            "KillMode=mixed",
            f"TimeoutStopSec={int(2 * self.stop_timeout + STOP_MARGIN)}",
            "Restart=on-failure",
            f"RestartSec={RESTART_DELAY}",
            "Environment=PYTHONUNBUFFERED=1",
        ]
        if self.run_as and not self.user_unit:
            lines.append(f"User={self.run_as}")
        if self.working_dir is not None:
            lines.append(f"WorkingDirectory={str(self.working_dir).replace('%', '%%')}")
        lines += ["", "[Install]",
                  f"WantedBy={'default.target' if self.user_unit else 'multi-user.target'}", ""]
        return "\n".join(lines)


def unit_dir(user_unit: bool) -> Path:
    if user_unit:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base) / "systemd" / "user"
    return Path("/etc/systemd/system")


def make_spec(config: Path | None, user_unit: bool) -> UnitSpec:
    """The unit for this lalo and this config (found by lalo's lookup order when not given)."""
    found = find_config_file(config)
    if found is None:
        raise UsageError("no lalo.yaml found: pass --config FILE (a service does not start in "
                         "this directory, so the file is named in the unit)")
    loaded = load_config(found)
    run_as = os.environ.get("SUDO_USER") or getpass.getuser()
    return UnitSpec(lalo_command(), found.resolve(), loaded.config.supervisor.stop_timeout,
                    user_unit, run_as=None if user_unit else run_as,
                    working_dir=found.resolve().parent)


class Service:
    """Install, remove and ask about the unit; `run` and `directory` are test hooks."""

    def __init__(self, user_unit: bool, *, run: Runner = run_systemctl,
                 directory: Path | None = None) -> None:
        self.user_unit = user_unit
        self.run = run
        self.directory = directory or unit_dir(user_unit)

    @property
    def path(self) -> Path:
        return self.directory / UNIT_NAME

    def _systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        if shutil.which("systemctl") is None and self.run is run_systemctl:
            raise ServiceError("systemctl not found: lalo service needs systemd (on Windows "
                               "see docs/dashboard.md, 'Running lalo as a service')")
        argv = ["systemctl", *(["--user"] if self.user_unit else []), *args]
        result = self.run(argv)
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            raise ServiceError(f"{' '.join(argv)} failed ({result.returncode}): {detail}")
        return result

    def install(self, spec: UnitSpec) -> Path:
        """Write the unit and enable and start it; a unit this call wrote is removed again
        when systemctl fails (no systemd running, no user session)."""
        existed = self.path.exists()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.path.write_text(spec.text())
        except PermissionError as exc:
            hint = "" if self.user_unit else " (a system unit needs root: sudo, or use --user)"
            raise ServiceError(f"cannot write {self.path}: {exc.strerror}{hint}") from exc
        try:
            self._systemctl("daemon-reload")
            self._systemctl("enable", "--now", UNIT_NAME)
        except ServiceError as exc:
            if not existed:
                self.path.unlink(missing_ok=True)
            hint = " (a user unit needs a login session with systemd; see `loginctl " \
                   "enable-linger`)" if self.user_unit else " (is systemd running?)"
            raise ServiceError(f"{exc}{hint}; {self.path} "
                               f"{'kept' if existed else 'not installed'}") from exc
        return self.path

    def uninstall(self) -> bool:
        """Stop, disable and remove the unit; False when there was none."""
        if not self.path.exists():
            return False
        self._systemctl("disable", "--now", UNIT_NAME, check=False)
        try:
            self.path.unlink()
        except PermissionError as exc:
            raise ServiceError(f"cannot remove {self.path}: {exc.strerror}") from exc
        self._systemctl("daemon-reload")
        return True

    def status(self) -> str:
        if not self.path.exists():
            return f"not installed ({self.path} does not exist)"
        result = self._systemctl("status", "--no-pager", "--lines=10", UNIT_NAME, check=False)
        # `systemctl status` exits 3 for a stopped unit: that is an answer, not a failure
        return (result.stdout or result.stderr).rstrip()
