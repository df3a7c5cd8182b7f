"""Install a Debian package for a test that needs it (as CI does), or say why not."""

from __future__ import annotations

import os
import shutil
import subprocess


def apt_install(package: str) -> str:
    """`apt-get install PACKAGE` (updating the lists once if needed): "" on success, else why."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this system"
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and shutil.which("sudo") is None:
        return "not root and no sudo"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
    result: subprocess.CompletedProcess[str] | None = None
    try:
        for command in (install, [*sudo, "apt-get", "update", "-qq"], install):
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            if command is install and result.returncode == 0:
                return ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    assert result is not None
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[-1] if lines else f"apt-get exited with {result.returncode}"
