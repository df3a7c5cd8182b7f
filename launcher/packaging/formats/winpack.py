"""The files that follow the Windows launcher in `NAME.exe` (read by packaging/windows/launcher.c).

A binary layout, not the Linux payload's JSON and zlib, so the C reader stays a page long:

    <launcher exe><file bytes ...><index><trailer>
    index   = b"LALOIDX1" u32 count, then per file: u16 path length, path (UTF-8, '/'),
              u64 offset (from the start of NAME.exe), u64 size, 32-byte sha256
    trailer = b"LALOWIN1" u64 index offset, u64 index size, sha256(index), b"LALOWIN1"

Little-endian throughout. sha256(index) covers every file's sha256, so it names the content:
its first 16 hex digits name the folder the launcher unpacks into.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import PackagingError
from launcher.packaging.atomic import atomic_output

PACK_MAGIC = b"LALOWIN1"
INDEX_MAGIC = b"LALOIDX1"
TRAILER = struct.Struct("<8sQQ32s8s")  # 64 bytes, as launcher.c's TRAILER_SIZE
ENTRY = struct.Struct("<QQ32s")
_CHUNK = 8 * 1024 * 1024
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PackFile:
    """One file of the pack: its path inside the unpacked folder, source and sha256."""

    path: str
    source: Path
    sha256: str


@dataclass(frozen=True)
class PackEntry:
    path: str
    offset: int
    size: int
    sha256: str


def write_packed_exe(launcher: Path, files: Sequence[PackFile], out: Path,
                     progress: Progress | None = None) -> str:
    """`out` = the launcher followed by `files`; the content id (sha256 of the index)."""
    for file in files:
        if file.path.startswith(("/", "\\")) or ".." in file.path or ":" in file.path:
            raise PackagingError(f"pack path {file.path!r} must stay inside the folder")
    total = sum(f.source.stat().st_size for f in files)
    done = 0
    with atomic_output(out, 0o755) as dest:
        with launcher.open("rb") as exe:
            shutil.copyfileobj(exe, dest, _CHUNK)
        entries = []
        for file in files:
            offset = dest.tell()
            with file.source.open("rb") as source:
                while block := source.read(_CHUNK):
                    dest.write(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
            entries.append(PackEntry(file.path, offset, dest.tell() - offset, file.sha256))
        index = encode_index(entries)
        index_offset = dest.tell()
        dest.write(index)
        digest = hashlib.sha256(index).digest()
        dest.write(TRAILER.pack(PACK_MAGIC, index_offset, len(index), digest, PACK_MAGIC))
    return digest.hex()


def encode_index(entries: Sequence[PackEntry]) -> bytes:
    parts = [INDEX_MAGIC, struct.pack("<I", len(entries))]
    for entry in entries:
        name = entry.path.encode("utf-8")
        if len(name) > 0xFFFF:
            raise PackagingError(f"pack path too long: {entry.path[:80]}...")
        parts += [struct.pack("<H", len(name)), name,
                  ENTRY.pack(entry.offset, entry.size, bytes.fromhex(entry.sha256))]
    return b"".join(parts)


def read_pack(exe: Path) -> tuple[str, list[PackEntry]]:
    """The content id and entries of a packed exe (what launcher.c reads); PackagingError if
    it carries no pack or a damaged one."""
    with exe.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        if size < TRAILER.size:
            raise PackagingError(f"{exe}: no pack")
        f.seek(size - TRAILER.size)
        magic, at, length, digest, end = TRAILER.unpack(f.read(TRAILER.size))
        if magic != PACK_MAGIC or end != PACK_MAGIC:
            raise PackagingError(f"{exe}: no pack")
        f.seek(at)
        index = f.read(length)
    if hashlib.sha256(index).digest() != digest or not index.startswith(INDEX_MAGIC):
        raise PackagingError(f"{exe}: the pack's index is damaged")
    (count,) = struct.unpack_from("<I", index, 8)
    pos, entries = 12, []
    for _ in range(count):
        (length_,) = struct.unpack_from("<H", index, pos)
        name = index[pos + 2: pos + 2 + length_].decode("utf-8")
        offset, file_size, sha = ENTRY.unpack_from(index, pos + 2 + length_)
        entries.append(PackEntry(name, offset, file_size, sha.hex()))
        pos += 2 + length_ + ENTRY.size
    return digest.hex(), entries
