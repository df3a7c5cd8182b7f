"""The single binary's payload on Linux: the engine and the models appended after PyInstaller's
executable (which finds its own archive through an ELF section, so trailing bytes are
harmless), extracted once per payload into lalo's cache instead of at every start.

Layout: `<executable><file bytes...><index JSON><u64 index offset><u64 index size><MAGIC>`.
The index lists each file's offset, stored size, size, sha256, mode and compression (zlib for
the engine, none for GGUF weights), or a symlink's target; its `key` (a hash of that list)
names the cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from launcher.errors import PackagingError
from launcher.packaging.atomic import atomic_output

MAGIC = b"LALO-PAYLOAD-v1\0"
TRAILER = struct.Struct("<QQ16s")
SCHEMA = 1
COMPLETE = ".complete"
COMPRESS_LEVEL = 6
_CHUNK = 8 * 1024 * 1024
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PayloadFile:
    """One file to append: `path` inside the payload, its source, sha256 and mode; or a link."""

    path: str
    source: Path | None = None
    sha256: str = ""
    mode: int = 0o644
    link: str | None = None
    compress: bool = False


@dataclass(frozen=True)
class Payload:
    """A payload's index as read back from an executable."""

    name: str
    key: str
    files: tuple[dict[str, Any], ...]

    @property
    def size(self) -> int:
        return sum(int(f.get("size", 0)) for f in self.files)

    def has(self, prefix: str) -> bool:
        return any(str(f["path"]).startswith(prefix) for f in self.files)


def append_payload(
    executable: Path,
    out: Path,
    name: str,
    files: Sequence[PayloadFile],
    progress: Progress | None = None,
) -> Payload:
    """Write `out` = `executable` + the files + index + trailer, atomically, mode 0755."""
    entries: list[dict[str, Any]] = []
    for item in sorted(files, key=lambda f: f.path):
        if item.link is not None:
            entries.append({"path": item.path, "link": item.link})
        else:
            assert item.source is not None
            entries.append({"path": item.path, "size": item.source.stat().st_size,
                            "sha256": item.sha256, "mode": item.mode,
                            "compression": "zlib" if item.compress else "none"})
    key = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    sources = {f.path: f.source for f in files if f.source is not None}
    total = executable.stat().st_size + sum(int(e.get("size", 0)) for e in entries)
    done = [0]

    def copy(source: Path, dest: BinaryIO, compress: bool = False) -> None:
        packer = zlib.compressobj(COMPRESS_LEVEL) if compress else None
        with source.open("rb") as src:
            for block in iter(lambda: src.read(_CHUNK), b""):
                dest.write(packer.compress(block) if packer else block)
                done[0] += len(block)
                if progress is not None:
                    progress(done[0], total)
        if packer is not None:
            dest.write(packer.flush())

    with atomic_output(out, 0o755) as dest:
        copy(executable, dest)
        for entry in entries:
            if "size" in entry:
                entry["offset"] = dest.tell()
                source = sources[entry["path"]]
                assert source is not None
                copy(source, dest, entry["compression"] == "zlib")
                entry["stored"] = dest.tell() - entry["offset"]
        index_offset = dest.tell()
        index = json.dumps({"schema": SCHEMA, "name": name, "key": key, "files": entries},
                           sort_keys=True).encode()
        dest.write(index)
        dest.write(TRAILER.pack(index_offset, len(index), MAGIC))
    return Payload(name=name, key=key, files=tuple(entries))


def read_payload(executable: Path) -> Payload | None:
    """The payload index at the end of `executable`, or None when it has none."""
    try:
        with executable.open("rb") as f:
            return _read_index(f)
    except OSError:
        return None


def _read_index(f: BinaryIO) -> Payload | None:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size < TRAILER.size:
        return None
    f.seek(size - TRAILER.size)
    offset, length, magic = TRAILER.unpack(f.read(TRAILER.size))
    if magic != MAGIC or offset + length + TRAILER.size != size:
        return None
    f.seek(offset)
    try:
        data = json.loads(f.read(length))
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return None
    return Payload(name=str(data["name"]), key=str(data["key"]), files=tuple(data["files"]))


def extracted(executable: Path, payload: Payload, cache: Path) -> Path:
    """The folder holding the payload's files: `cache/<name>-<key16>/`, extracted on first use
    (into a temp folder renamed into place, every file checked against its sha256); older
    payloads of the same name are removed."""
    folder = cache / f"{payload.name}-{payload.key[:16]}"
    if (folder / COMPLETE).is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=cache))
    try:
        with executable.open("rb") as src:
            for entry in payload.files:
                target = staging / Path(*str(entry["path"]).split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                if "link" in entry:
                    target.symlink_to(str(entry["link"]))
                    continue
                _copy_range(src, entry, target)
                target.chmod(int(entry["mode"]))
        (staging / COMPLETE).write_text(payload.key + "\n", encoding="utf-8")
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / COMPLETE).is_file():  # not a concurrent start that got there first
                shutil.rmtree(folder, ignore_errors=True)
                staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in cache.glob(f"{payload.name}-*"):
        if old != folder and old.is_dir() and len(old.name) == len(folder.name):
            # Running processes keep their open files: removing is safe on POSIX.
            shutil.rmtree(old, ignore_errors=True)
    return folder


def _copy_range(src: BinaryIO, entry: dict[str, Any], target: Path) -> None:
    """Write one entry's bytes (inflating zlib ones) and check its size and sha256."""
    unpacker = zlib.decompressobj() if entry.get("compression") == "zlib" else None
    digest = hashlib.sha256()
    src.seek(int(entry["offset"]))
    left = int(entry.get("stored", entry["size"]))
    written = 0
    with target.open("wb") as dest:
        while left:
            block = src.read(min(left, _CHUNK))
            if not block:
                raise PackagingError(f"payload entry {entry['path']} is cut short")
            left -= len(block)
            data = unpacker.decompress(block) if unpacker else block
            digest.update(data)
            dest.write(data)
            written += len(data)
        if unpacker is not None:
            tail = unpacker.flush()
            digest.update(tail)
            dest.write(tail)
            written += len(tail)
    if written != int(entry["size"]) or (entry["sha256"] and digest.hexdigest() != entry["sha256"]):
        raise PackagingError(f"payload entry {entry['path']} does not match its size or sha256")
