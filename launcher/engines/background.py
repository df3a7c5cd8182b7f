"""An engine build in a thread, so that `lalo up` pulls its models while llama-server compiles.

Both are blocking subprocess work (cmake, pip) done before the event loop starts; a thread is
the smallest way to overlap them. The build's commands run in their own sessions (toolrun), so
Ctrl+C reaches lalo's main thread alone: `cancel()` then stops the compiler's process group.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from launcher.errors import EngineError
from launcher.toolrun import STOP_TIMEOUT, run_lines, stop_group

T = TypeVar("T")


class CancellableRunner:
    """A builder CommandRunner whose running command another thread can stop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._cancelled = False

    def __call__(self, argv: Sequence[str], *, cwd: Path, on_line: Callable[[str], None]) -> int:
        with self._lock:
            if self._cancelled:
                raise EngineError("the llama-server build was cancelled")
        try:
            return run_lines(argv, cwd=cwd, on_line=on_line, on_start=self._started)
        except OSError as exc:
            raise EngineError(f"cannot run {argv[0]}: {exc}") from exc
        finally:
            with self._lock:
                self._proc = None

    def _started(self, proc: subprocess.Popen[str]) -> None:
        with self._lock:
            self._proc = proc
            cancelled = self._cancelled
        if cancelled:  # cancel() came between the check above and the start
            stop_group(proc)

    def cancel(self) -> None:
        """Stop the running command's group (TERM, wait, KILL) and refuse any further one."""
        with self._lock:
            self._cancelled = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            stop_group(proc)


class BackgroundBuild(Generic[T]):
    """`work(runner)` in a daemon thread: `wait()` returns its result or raises its error;
    `cancel()` stops it (a daemon, so that an interrupted `lalo up` never waits for a pip
    download that the runner cannot stop)."""

    def __init__(self, work: Callable[[CancellableRunner], T]) -> None:
        self.runner = CancellableRunner()
        self._work = work
        self._result: list[T] = []  # a list: T may be None
        self._error: BaseException | None = None
        # waited on instead of Thread.join: a join that Ctrl+C interrupts marks the thread as
        # stopped while it still runs (CPython 3.11), and a second join would not wait for it
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-build", daemon=True)

    def start(self) -> BackgroundBuild[T]:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._result.append(self._work(self.runner))
        except BaseException as exc:  # handed to the thread that waits: it reports or raises
            self._error = exc
        finally:
            self._done.set()

    def wait(self) -> T:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result[0]

    def cancel(self, timeout: float = STOP_TIMEOUT + 5) -> None:
        self.runner.cancel()
        self._done.wait(timeout)
