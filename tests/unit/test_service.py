"""The systemd unit lalo writes, checked by `systemd-analyze verify` (Debian's systemd), and
what install / uninstall / status ask systemctl (recorded: no systemd runs in a container)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from launcher.errors import UsageError
from launcher.serve.service import Service, ServiceError, UnitSpec, make_spec, quote
from tests.support.apt import apt_install


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        reason = apt_install("systemd")
        found = shutil.which("systemd-analyze")
        if found is None:
            pytest.skip(f"systemd-analyze is missing and `apt-get install systemd` failed: {reason}")
    return found


def verify(analyze: str, unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)


def config(tmp_path: Path, stop_timeout: float = 10) -> Path:
    path = tmp_path / "my config" / "lalo.yaml"
    path.parent.mkdir()
    path.write_text(f"supervisor:\n  stop_timeout: {stop_timeout}\nmodels: {{}}\n")
    return path


@pytest.mark.parametrize("user_unit", [False, True])
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, systemd_analyze: str,
                                            user_unit: bool) -> None:
    spec = make_spec(config(tmp_path, stop_timeout=30), user_unit)
    unit = tmp_path / "lalo.service"
    unit.write_text(spec.text())
    result = verify(systemd_analyze, unit)
    assert result.returncode == 0, result.stderr
    assert "lalo.service" not in result.stderr, result.stderr  # no warnings about our unit
    text = spec.text()
    assert f'--config "{tmp_path}/my config/lalo.yaml"' in text  # pinned, absolute, quoted
    assert "TimeoutStopSec=80\n" in text  # 2 x stop_timeout + margin
    for line in ("KillSignal=SIGTERM", "KillMode=mixed", "Restart=on-failure"):
        assert line + "\n" in text
    assert ("WantedBy=default.target" in text) == user_unit
    assert ("User=" in text) != user_unit


def test_verify_catches_a_broken_unit(tmp_path: Path, systemd_analyze: str) -> None:
    """The check above can fail: a missing program and a bad setting are both reported."""
    unit = tmp_path / "lalo.service"
    unit.write_text(UnitSpec(["lalo"], tmp_path / "x.yaml", 10, False).text()
                    .replace("KillMode=mixed", "KillMode=sometimes"))
    result = verify(systemd_analyze, unit)
    assert result.returncode != 0
    assert "kill mode" in result.stderr and "not executable" in result.stderr


def test_quoting_for_exec_start() -> None:
    assert quote("/usr/bin/lalo") == "/usr/bin/lalo"
    assert quote("/a b/c") == '"/a b/c"'
    assert quote("100%") == '"100%%"'
    assert quote('$HOME"x') == '"$$HOME\\"x"'


def test_no_config_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LALO_CONFIG", raising=False)
    monkeypatch.setenv("LALO_CONFIG_DIR", str(tmp_path / "none"))
    with pytest.raises(UsageError, match="--config"):
        make_spec(None, user_unit=True)


class Recorder:
    def __init__(self, failing: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.failing = failing

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        code = 1 if self.failing and self.failing in argv else 0
        return subprocess.CompletedProcess(list(argv), code, "active (running)", "boom")


def test_install_status_uninstall(tmp_path: Path) -> None:
    recorder = Recorder()
    service = Service(True, run=recorder, directory=tmp_path / "units")
    assert "not installed" in service.status()
    spec = make_spec(config(tmp_path), user_unit=True)
    path = service.install(spec)
    assert path.read_text() == spec.text()
    assert recorder.calls == [["systemctl", "--user", "daemon-reload"],
                              ["systemctl", "--user", "enable", "--now", "lalo.service"]]
    assert service.status() == "active (running)"
    assert service.uninstall() is True
    assert not path.exists()
    assert recorder.calls[-2:] == [["systemctl", "--user", "disable", "--now", "lalo.service"],
                                   ["systemctl", "--user", "daemon-reload"]]
    assert service.uninstall() is False


def test_a_failing_systemctl_is_reported(tmp_path: Path) -> None:
    service = Service(False, run=Recorder(failing="enable"), directory=tmp_path)
    with pytest.raises(ServiceError, match=r"systemctl enable --now lalo.service failed \(1\): "
                                           r"boom \(is systemd running\?\); .* not installed"):
        service.install(make_spec(config(tmp_path), user_unit=False))
    assert not service.path.exists()  # nothing left behind
