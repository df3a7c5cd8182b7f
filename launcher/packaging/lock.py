"""One `lalo build` at a time uses the packaging cache (the frozen lalo being made, the one-file
build's work and stage folders): a second waits for the first, saying so, then finds the
frozen lalo already made. POSIX advisory lock (flock); on Windows nothing is locked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_FILE = ".build.lock"


@contextlib.contextmanager
def packaging_lock(folder: Path, report: Callable[[str], None]) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK_FILE).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report(f"waiting for another `lalo build` using {folder} to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
