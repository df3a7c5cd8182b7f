"""Wheels (PEP 427) written with the standard library: members sorted, with one fixed timestamp
(the same input gives the same bytes), file modes kept (pip installs an executable member as an
executable) and RECORD, written last, with each member's sha256 and size (PEP 376).
"""

from __future__ import annotations

import base64
import hashlib
import io
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from launcher.packaging.atomic import atomic_output
from launcher.packaging.formats.archive import fixed_mtime

_CHUNK = 1 << 20
_ZIP32_LIMIT = 0x7FFFFFFF  # a member larger than this needs ZIP64 fields, said before writing
ZIP_EPOCH = 315532800  # 1980-01-01: zip timestamps cannot be earlier


@dataclass(frozen=True)
class WheelMember:
    name: str  # inside the wheel, `/`-separated
    data: bytes | Path
    executable: bool = False


def write_wheel(out: Path, members: Sequence[WheelMember], dist_info: str,
                *, mtime: int | None = None) -> Path:
    """Write `out` (atomically) from `members` plus `<dist_info>/RECORD`; `mtime` (default
    SOURCE_DATE_EPOCH, else a fixed date) is every member's timestamp."""
    stamp = time.gmtime(max(fixed_mtime() if mtime is None else mtime, ZIP_EPOCH))[:6]
    record = f"{dist_info}/RECORD"
    lines: list[str] = []
    with atomic_output(out, 0o644) as dest, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as archive:
        for member in sorted(members, key=lambda item: item.name):
            digest, size = _add(archive, member, stamp)
            lines.append(f"{member.name},sha256={digest},{size}")
        lines.append(f"{record},,")  # RECORD cannot hold its own digest
        _add(archive, WheelMember(record, ("\n".join(lines) + "\n").encode()), stamp)
    return out


def _add(archive: zipfile.ZipFile, member: WheelMember,
         stamp: tuple[int, int, int, int, int, int]) -> tuple[str, int]:
    info = zipfile.ZipInfo(member.name, stamp)
    info.compress_type = zipfile.ZIP_DEFLATED
    # a regular file's mode in the high 16 bits, where pip reads the executable bit from
    info.external_attr = (0o100755 if member.executable else 0o100644) << 16
    digest = hashlib.sha256()
    size = 0
    source: BinaryIO
    if isinstance(member.data, bytes):
        source, large = io.BytesIO(member.data), len(member.data) > _ZIP32_LIMIT
    else:
        source, large = member.data.open("rb"), member.data.stat().st_size > _ZIP32_LIMIT
    with source, archive.open(info, "w", force_zip64=large) as sink:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            sink.write(chunk)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode(), size
