"""Reproducible `.tar.gz` of a directory: sorted entries, fixed mtimes, owners and modes, and a
gzip header without name or time, so the same tree always gives the same bytes.
"""

from __future__ import annotations

import gzip
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from launcher.errors import PackagingError
from launcher.packaging.atomic import atomic_output

# 2020-01-01T00:00:00Z; SOURCE_DATE_EPOCH (reproducible-builds.org) wins when set.
DEFAULT_MTIME = 1577836800
COMPRESS_LEVEL = 6
_CHUNK = 1 << 20

Progress = Callable[[int, int], None]
"""progress(bytes_done, bytes_total) over the regular files' contents."""


def fixed_mtime() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return DEFAULT_MTIME
    try:
        return max(int(value), 0)
    except ValueError:
        raise PackagingError(f"SOURCE_DATE_EPOCH must be an integer, got {value!r}") from None


def walk_sorted(root: Path) -> Iterator[Path]:
    """Every file, link and directory under root (not root itself), sorted by relative path
    with `/` as separator, so the order is the same on every machine."""
    entries: list[tuple[str, Path]] = []
    for directory, dirs, files in os.walk(root, followlinks=False):
        base = Path(directory)
        for name in [*dirs, *files]:
            path = base / name
            entries.append((path.relative_to(root).as_posix(), path))
    for _, path in sorted(entries):
        yield path


def write_tar_gz(
    source: Path,
    out: Path,
    *,
    prefix: str | None = None,
    mtime: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Archive `source` as `prefix/...` (default: the directory's name) into `out`, atomically.

    Owners are 0/0 without names; directories and executables 0755, other files 0644;
    symlinks are kept as links (targets must stay inside the tree).
    """
    if not source.is_dir():
        raise PackagingError(f"{source}: not a directory")
    top = prefix if prefix is not None else source.name
    when = fixed_mtime() if mtime is None else mtime
    paths = list(walk_sorted(source))
    total = sum(p.lstat().st_size for p in paths if stat.S_ISREG(p.lstat().st_mode))
    done = 0
    with atomic_output(out, 0o644) as raw, _gzip(raw, when) as compressed, tarfile.open(
        fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT
    ) as tar:
        tar.addfile(_info(f"{top}/", source, when))
        for path in paths:
            name = f"{top}/{path.relative_to(source).as_posix()}"
            info = _info(name, path, when)
            if info.isreg():
                with path.open("rb") as data:
                    tar.addfile(info, data)
                done += info.size
                if progress is not None:
                    progress(done, total)
            else:
                tar.addfile(info)
    return out


def write_tar(source: Path, out: Path, *, mtime: int = 0) -> Path:
    """An uncompressed tar of what is inside `source` (no top folder: an OCI image layout as
    `podman load` reads it), with the same fixed owners, modes and order, atomically."""
    if not source.is_dir():
        raise PackagingError(f"{source}: not a directory")
    with atomic_output(out, 0o644) as raw, tarfile.open(
        fileobj=raw, mode="w", format=tarfile.PAX_FORMAT
    ) as tar:
        for path in walk_sorted(source):
            info = _info(path.relative_to(source).as_posix(), path, mtime)
            if info.isreg():
                with path.open("rb") as data:
                    tar.addfile(info, data)
            else:
                tar.addfile(info)
    return out


def _gzip(raw: BinaryIO, when: int) -> gzip.GzipFile:
    # filename="" and a fixed mtime: the gzip header must not record where or when it was made.
    return gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=COMPRESS_LEVEL,
                         mtime=when)


def _info(name: str, path: Path, when: int) -> tarfile.TarInfo:
    st = path.lstat()
    info = tarfile.TarInfo(name.rstrip("/"))
    info.mtime = when
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        if os.path.isabs(target) or ".." in Path(target).parts:
            raise PackagingError(f"{path}: links outside the tree ({target})")
        info.type = tarfile.SYMTYPE
        info.linkname = target
        info.mode = 0o777
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    elif stat.S_ISREG(st.st_mode):
        info.type = tarfile.REGTYPE
        info.size = st.st_size
        info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    else:
        raise PackagingError(f"{path}: not a file, directory or symlink")
    return info

