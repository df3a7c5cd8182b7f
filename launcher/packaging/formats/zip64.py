"""ZIP records as llamafiles use them: encoding the always-ZIP64 records we append, and
reading an existing central directory (classic or ZIP64) back into entries.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from launcher.errors import PackagingError

LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # 30 bytes
CENTRAL_RECORD = struct.Struct("<4s6H3L5H2L")  # 46 bytes
EOCD64 = struct.Struct("<4sQ2H2L4Q")  # 56 bytes
LOCATOR = struct.Struct("<4sLQL")  # 20 bytes
EOCD = struct.Struct("<4s4H2LH")  # 22 bytes

LOCAL_SIG = b"PK\x03\x04"
CENTRAL_SIG = b"PK\x01\x02"
EOCD64_SIG = b"PK\x06\x06"
LOCATOR_SIG = b"PK\x06\x07"
EOCD_SIG = b"PK\x05\x06"

LOCAL_EXTRA_SIZE = 20  # ZIP64 extra {id, len 16, size, compressed size}
CRC_OFFSET = 14  # of the CRC-32 field inside a local header, patched after streaming
METHOD_STORED = 0

_MADE_BY = 0x032D  # Unix, spec 4.5
_NEEDED = 45  # ZIP64
_UTF8 = 0x0800
# Fixed DOS stamp (1980-01-01 00:00) so the same inputs always give the same bytes.
DOS_TIME = 0
DOS_DATE = (0 << 9) | (1 << 5) | 1
_ZIP64_ID = 0x0001
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_MAX_COMMENT = 0xFFFF


@dataclass(frozen=True)
class ZipEntry:
    """One entry of a zip; offsets are absolute file offsets."""

    name: str
    header_offset: int
    data_offset: int
    size: int
    compressed_size: int
    crc: int
    method: int
    central_record: bytes = field(repr=False)


def padding_before(position: int, name_size: int, alignment: int) -> int:
    """Zero bytes to write at `position` so the entry's data starts on a multiple of alignment."""
    return -(position + LOCAL_HEADER.size + name_size + LOCAL_EXTRA_SIZE) % alignment


def local_header(name: bytes, size: int, crc: int) -> bytes:
    zip64 = struct.pack("<2H2Q", _ZIP64_ID, 16, size, size)
    fixed = LOCAL_HEADER.pack(
        LOCAL_SIG, _NEEDED, _UTF8, METHOD_STORED, DOS_TIME, DOS_DATE,
        crc, _U32, _U32, len(name), len(zip64),
    )  # fmt: skip
    return fixed + name + zip64


def central_record(name: bytes, size: int, crc: int, header_offset: int) -> bytes:
    zip64 = struct.pack("<2H3Q", _ZIP64_ID, 24, size, size, header_offset)
    external = 0o100644 << 16  # regular file, rw-r--r--: the same bits whatever the input had
    fixed = CENTRAL_RECORD.pack(
        CENTRAL_SIG, _MADE_BY, _NEEDED, _UTF8, METHOD_STORED, DOS_TIME, DOS_DATE,
        crc, _U32, _U32, len(name), len(zip64), 0, 0, 0, external, _U32,
    )  # fmt: skip
    return fixed + name + zip64


def end_records(cd_offset: int, cd_size: int, count: int) -> bytes:
    """EOCD64 + locator + classic EOCD for a directory that starts at `cd_offset`.

    Always ZIP64, whatever the size; the classic record only points readers at the locator.
    """
    eocd64_offset = cd_offset + cd_size
    eocd64 = EOCD64.pack(
        EOCD64_SIG, EOCD64.size - 12, _MADE_BY, _NEEDED, 0, 0,
        count, count, cd_size, cd_offset,
    )  # fmt: skip
    locator = LOCATOR.pack(LOCATOR_SIG, 0, eocd64_offset, 1)
    short_count = min(count, _U16)
    eocd = EOCD.pack(EOCD_SIG, 0, 0, short_count, short_count, min(cd_size, _U32), _U32, 0)
    return eocd64 + locator + eocd


def read_central_directory(f: BinaryIO, end: int, source: Path) -> tuple[ZipEntry, ...] | None:
    """Entries of the zip whose end record finishes at `end`; None when there is no zip.

    Raises PackagingError when an end record is there but what it points at is not a
    sound directory with absolute offsets.
    """
    tail_size = min(end, EOCD.size + _MAX_COMMENT)
    tail = _read_at(f, end - tail_size, tail_size, source)
    eocd_at = _find_eocd(tail)
    if eocd_at is None:
        return None
    eocd_pos = end - tail_size + eocd_at
    _, disk, cd_disk, _, count, cd_size, cd_offset, _ = EOCD.unpack_from(tail, eocd_at)
    directory_end = eocd_pos
    locator_pos = eocd_pos - LOCATOR.size
    if locator_pos >= 0 and _read_at(f, locator_pos, 4, source) == LOCATOR_SIG:
        _, _, eocd64_pos, _ = LOCATOR.unpack(_read_at(f, locator_pos, LOCATOR.size, source))
        record = _read_at(f, eocd64_pos, EOCD64.size, source)
        if record[:4] != EOCD64_SIG:
            raise PackagingError(f"{source}: ZIP64 locator points at no ZIP64 end record")
        _, _, _, _, disk, cd_disk, _, count, cd_size, cd_offset = EOCD64.unpack(record)
        directory_end = eocd64_pos
    if disk != 0 or cd_disk != 0:
        raise PackagingError(f"{source}: multi-disk zip archives are not supported")
    if cd_offset + cd_size != directory_end:
        # Also what a zip glued onto a stub with `cat` looks like: offsets count from the
        # zip's start, while a llamafile's runtime reads them as file offsets.
        raise PackagingError(
            f"{source}: zip central directory is not where its end record says "
            "(corrupt, or offsets relative to a prepended stub: fix with `zip -A`)"
        )
    directory = _read_at(f, cd_offset, cd_size, source)
    entries = []
    pos = 0
    for _ in range(count):
        entry, pos = _parse_record(f, directory, pos, cd_offset, source)
        entries.append(entry)
    if pos != cd_size:
        raise PackagingError(f"{source}: zip central directory size does not match its records")
    return tuple(entries)


def _find_eocd(tail: bytes) -> int | None:
    """Position in `tail` of the end record whose comment reaches exactly the end."""
    at = tail.rfind(EOCD_SIG)
    while at >= 0:
        if at + EOCD.size <= len(tail):
            comment_size = EOCD.unpack_from(tail, at)[-1]
            if at + EOCD.size + comment_size == len(tail):
                return at
        at = tail.rfind(EOCD_SIG, 0, at)
    return None


def _parse_record(
    f: BinaryIO, directory: bytes, pos: int, cd_offset: int, source: Path
) -> tuple[ZipEntry, int]:
    if pos + CENTRAL_RECORD.size > len(directory) or directory[pos : pos + 4] != CENTRAL_SIG:
        raise PackagingError(f"{source}: zip central directory record {pos} is corrupt")
    fields = CENTRAL_RECORD.unpack_from(directory, pos)
    flags, method, crc, compressed, size = fields[3], fields[4], fields[7], fields[8], fields[9]
    name_len, extra_len, comment_len, offset = fields[10], fields[11], fields[12], fields[16]
    name_at = pos + CENTRAL_RECORD.size
    record_end = name_at + name_len + extra_len + comment_len
    if record_end > len(directory):
        raise PackagingError(f"{source}: zip central directory record {pos} is truncated")
    raw_name = directory[name_at : name_at + name_len]
    try:
        name = raw_name.decode("utf-8" if flags & _UTF8 else "cp437")
    except UnicodeDecodeError as exc:
        raise PackagingError(f"{source}: zip entry name {raw_name!r} is not UTF-8") from exc
    extra = directory[name_at + name_len : name_at + name_len + extra_len]
    size, compressed, offset = _apply_zip64(extra, size, compressed, offset, source, name)
    header = _read_at(f, offset, LOCAL_HEADER.size, source)
    if header[:4] != LOCAL_SIG:
        raise PackagingError(f"{source}: zip entry {name}: no local header at {offset}")
    local_name_len, local_extra_len = struct.unpack_from("<2H", header, 26)
    data_offset = offset + LOCAL_HEADER.size + local_name_len + local_extra_len
    if data_offset + compressed > cd_offset:
        raise PackagingError(f"{source}: zip entry {name} runs into the central directory")
    entry = ZipEntry(
        name=name,
        header_offset=offset,
        data_offset=data_offset,
        size=size,
        compressed_size=compressed,
        crc=crc,
        method=method,
        central_record=directory[pos:record_end],
    )
    return entry, record_end


def _apply_zip64(
    extra: bytes, size: int, compressed: int, offset: int, source: Path, name: str
) -> tuple[int, int, int]:
    """Replace the 32-bit fields that say 0xFFFFFFFF by their ZIP64 extra values, in order."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<2H", extra, pos)
        body = extra[pos + 4 : pos + 4 + length]
        if tag == _ZIP64_ID:
            values = [v for (v,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
            fields = [size, compressed, offset]
            for i, value in enumerate(fields):
                if value == _U32:
                    if not values:
                        raise PackagingError(f"{source}: zip entry {name}: short ZIP64 field")
                    fields[i] = values.pop(0)
            return fields[0], fields[1], fields[2]
        pos += 4 + length
    return size, compressed, offset


def _read_at(f: BinaryIO, offset: int, size: int, source: Path) -> bytes:
    if offset < 0:
        raise PackagingError(f"{source}: zip record points before the start of the file")
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise PackagingError(f"{source}: truncated: zip record at {offset} runs past the end")
    return data
