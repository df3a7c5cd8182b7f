"""Outputs that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from launcher.errors import PackagingError


@contextlib.contextmanager
def atomic_output(out: Path, mode: int, *, fsync: bool = False) -> Iterator[BinaryIO]:
    """Write `out` through a temporary file beside it, renamed into place with `mode` when the
    block ends; on any error (a full disk, Ctrl+C) the temporary file is removed and an
    earlier `out` is left as it was. OSError becomes PackagingError naming `out`."""
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp",
                                         dir=out.parent)
    except OSError as exc:
        raise PackagingError(f"cannot write {out}: {exc}") from exc
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "w+b") as dest:
            yield dest
            dest.flush()
            if fsync:
                os.fsync(dest.fileno())
        os.chmod(temp, mode)
        os.replace(temp, out)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise PackagingError(f"cannot write {out}: {exc}") from exc
        raise


# What a build writes before its output is whole, each named with the writing process's pid:
# `.NAME.staging-PID`, `.NAME.old-PID`, `.NAME.exe-staging-PID` folders, `.app-KEY-PID` (the
# frozen lalo) and atomic_output's `.NAME.PID.RANDOM.tmp` files.
_PARTIAL = re.compile(r"^\.(?:.+\.(?:staging|old|exe-staging)-|app-[0-9a-f]+-)(\d+)$"
                      r"|^\..+\.(\d+)\.[a-z0-9_]{8}\.tmp$")  # mkstemp's 8 letters


def remove_stale(folder: Path) -> list[Path]:
    """Remove what builds killed mid-write (kill -9, a power cut) left in `folder`: partial
    outputs whose process is gone; those of a running build are left alone. Returns them."""
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _PARTIAL.match(path.name)
        if match is None or _running(int(match.group(1) or match.group(2))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: alive
    return True
