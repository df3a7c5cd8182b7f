"""Room on the disk for what a build writes: checked before it starts (one clear error naming
the folder, the room needed and the room free) and named again when the disk fills up during
the build (another writer took the room)."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterable
from pathlib import Path

from launcher.errors import PackagingError
from launcher.units import format_size

MARGIN = 16 * 1024**2  # file system overhead, the manifest, NOTICE, start scripts


def tree_size(root: Path) -> int:
    """Bytes of the regular files under `root` (links not followed)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def require_room(out: Path, parts: Iterable[tuple[str, int]]) -> int:
    """PackagingError unless the file system of `out` has room for every (what, bytes) part
    plus a margin; returns the bytes needed."""
    parts = [(what, size) for what, size in parts if size > 0]
    needed = sum(size for _, size in parts) + MARGIN
    free = shutil.disk_usage(out).free
    if free < needed:
        detail = ", ".join(f"{what} {format_size(size)}" for what, size in parts)
        raise PackagingError(
            f"not enough room in {out}: the build needs {format_size(needed)} ({detail}), "
            f"{format_size(free)} free there; free some space or build with --out on a larger "
            "disk (nothing was written)")
    return needed


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a full disk or an exceeded quota."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def disk_filled(out: Path, needed: int, exc: BaseException) -> PackagingError:
    """The error for a disk that filled up during the build (the room was there at the start)."""
    free = format_size(shutil.disk_usage(out).free)
    return PackagingError(
        f"the disk filled up while building in {out} ({exc}): the build needs "
        f"{format_size(needed)}, {free} free there now; nothing half-written was kept; free "
        "some space and build again")
