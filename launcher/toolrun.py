"""Run a long build tool (cmake, PyInstaller), handing each output line to a callback.

The tool runs in its own session so that Ctrl+C reaches lalo alone; lalo then stops the
tool's whole process group (TERM, wait, KILL) and always reaps it, so an interrupted build
leaves no compiler behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

STOP_TIMEOUT = 10.0  # seconds between TERM and KILL for an interrupted tool


def run_lines(
    argv: Sequence[str],
    *,
    cwd: Path,
    on_line: Callable[[str], None],
    env: Mapping[str, str] | None = None,
    on_start: Callable[[subprocess.Popen[str]], None] | None = None,
) -> int:
    """Run `argv`, pass each line of its merged output to `on_line`, return its exit code.
    `on_start` gets the started process (so that another thread can stop its group).

    Raises OSError when the tool cannot be started at all."""
    proc = subprocess.Popen(
        list(argv), cwd=cwd, env=dict(env) if env is not None else None,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, errors="replace", bufsize=1, start_new_session=os.name != "nt",
    )
    try:
        if on_start is not None:
            on_start(proc)
        assert proc.stdout is not None
        for line in proc.stdout:
            on_line(line.rstrip("\r\n"))
        return proc.wait()
    finally:
        if proc.poll() is None:
            stop_group(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def stop_group(proc: subprocess.Popen[str]) -> None:
    """TERM the tool's process group, wait, then KILL it; always reap."""
    def signal_group(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.name == "nt":
                proc.kill()
            else:
                os.killpg(proc.pid, sig)

    signal_group(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        signal_group(signal.SIGKILL if os.name != "nt" else signal.SIGTERM)
        proc.wait()
