"""One `lalo build` at a time uses the packaging cache (the frozen lalo being made, the one-file
build's work and stage folders): a second waits for the first, saying so, then finds the
frozen lalo already made.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_FILE = ".build.lock"


@contextlib.contextmanager
def packaging_lock(folder: Path, report: Callable[[str], None]) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        report(f"waiting for another `lalo build` using {folder} to finish")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
