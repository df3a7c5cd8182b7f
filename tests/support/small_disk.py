"""A small real filesystem to write on: a tmpfs with a size, mounted and always unmounted, and a
filler that takes the room another writer would."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class MountRefused(Exception):
    """This machine does not let us mount a tmpfs (not root, or a container without the right)."""


@contextmanager
def small_disk(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes at `path` (created), unmounted when the block ends."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise MountRefused(f"cannot mount a tmpfs at {path}: {(done.stderr or done.stdout).strip()}")
    try:
        yield path
    finally:
        # lazy: a process killed by the test may still hold a file open for a moment
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def resize(path: Path, size: int) -> None:
    """Give the tmpfs at `path` a new size (more room, as when a user frees some)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True,
                   capture_output=True)


def fill(directory: Path, leave: int = 0) -> Path:
    """Write a filler file in `directory` until at most `leave` bytes stay free there."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb") as out, contextlib.suppress(OSError):  # ENOSPC: full
        while shutil.disk_usage(directory).free > leave:
            room = shutil.disk_usage(directory).free - leave
            out.write(chunk[:max(1, min(len(chunk), room))])
            out.flush()
    return filler


def free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free
