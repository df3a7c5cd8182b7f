"""File helpers for packaging: copies that hash as they go, a digest cache so unchanged
multi-GB models are not hashed on every build, and the shared libraries a binary needs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from launcher.digest import file_sha256
from launcher.errors import PackagingError

_CHUNK = 8 * 1024 * 1024
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FileRecord:
    """A file of an output tree as manifest.json lists it."""

    path: str  # relative, `/`-separated
    size: int = 0
    sha256: str = ""
    link: str | None = None

    def to_json(self) -> dict[str, object]:
        if self.link is not None:
            return {"path": self.path, "link": self.link}
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


class DigestCache:
    """sha256 of files keyed by (real path, size, mtime, inode, ctime): a second build reads
    nothing. The inode and ctime make a file written again at the same path with the same size
    within one timestamp tick (an archive rebuilt, a rename into place) a different key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            self.entries: dict[str, str] = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            self.entries = {}

    @staticmethod
    def _key(path: Path) -> str:
        st = path.stat()
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"

    def sha256(self, path: Path, progress: Progress | None = None) -> str:
        key = self._key(path)
        known = self.entries.get(key)
        if known is None:
            known = file_sha256(path, progress)
            self.entries[key] = known
        return known

    def remember(self, path: Path, digest: str) -> None:
        self.entries[self._key(path)] = digest

    def save(self) -> None:
        """Write the cache, dropping entries of files that no longer exist (staging names)."""
        self.entries = {k: v for k, v in self.entries.items() if Path(k.split("|", 1)[0]).exists()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(json.dumps(self.entries, indent=0, sort_keys=True), encoding="utf-8")
        os.replace(temp, self.path)


def copy_file(source: Path, dest: Path, *, reuse: Path | None = None) -> bool:
    """Copy `source` to `dest` keeping its mode and mtime; when `reuse` (the same file in a
    previous output) has the same size and mtime, hard-link it instead. True if reused."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = source.stat()
        if reuse is not None and reuse.is_file() and not reuse.is_symlink():
            old = reuse.stat()
            if (old.st_size, old.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                try:
                    os.link(reuse, dest)
                    return True
                except OSError:
                    pass  # another file system, or no hard links: copy
        shutil.copy2(source, dest)
    except OSError as exc:
        raise PackagingError(f"cannot copy {source} to {dest}: {exc}") from exc
    return False


def copy_tree(source: Path, dest: Path) -> None:
    """Copy a folder keeping symlinks as links (PyInstaller apps use them)."""
    try:
        shutil.copytree(source, dest, symlinks=True)
    except (OSError, shutil.Error) as exc:
        raise PackagingError(f"cannot copy {source} to {dest}: {exc}") from exc


def records(root: Path, digests: DigestCache, skip: Iterable[str] = ()) -> list[FileRecord]:
    """Every file and link under root, sorted by path, with size and sha256."""
    from launcher.packaging.formats.archive import walk_sorted

    skipped = set(skip)
    found: list[FileRecord] = []
    for path in walk_sorted(root):
        rel = path.relative_to(root).as_posix()
        if rel in skipped:
            continue
        if path.is_symlink():
            found.append(FileRecord(rel, link=os.readlink(path)))
        elif path.is_file():
            found.append(FileRecord(rel, path.stat().st_size, digests.sha256(path)))
    return found


def needed_libraries(binaries: Iterable[Path], shipped: Iterable[str]) -> list[str]:
    """Shared libraries the binaries load (ELF DT_NEEDED, via readelf) that are not shipped
    beside them: what the client machine must provide. Empty where readelf is missing."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return []
    have = set(shipped)
    needed: set[str] = set()
    for binary in binaries:
        try:
            done = subprocess.run(
                [readelf, "-d", str(binary)], capture_output=True, text=True, timeout=30,
                check=False, stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in done.stdout.splitlines():
            if "(NEEDED)" in line and "[" in line:
                needed.add(line.rsplit("[", 1)[1].rstrip("]"))
    return sorted(needed - have)
