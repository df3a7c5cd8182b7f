"""Outputs that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
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
        fd, temp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
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
