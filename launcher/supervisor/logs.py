"""Per-model server logs: a size-capped file with rotation, plus a bounded in-memory tail."""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import shutil
from pathlib import Path
from typing import BinaryIO

from launcher.units import format_size

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 * 1024**2
DEFAULT_BACKUPS = 3
TAIL_LINES = 500
_BUFFER = re.compile(rb"(\w[\w ]*?) buffer size =\s+([\d.]+) MiB")


class ModelLog:
    """Where one model's server output goes. Only the owning ManagedModel writes to it."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 backups: int = DEFAULT_BACKUPS) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.buffers: dict[str, int] = {}  # buffer sizes the server's current run logged, bytes
        self._file: BinaryIO | None = None
        self._size = 0
        self._partial = b""
        self.lost = 0  # bytes not written to the file since it last failed (a full disk)

    def open(self) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
            self._size = self._file.tell()

    def new_run(self) -> None:
        """A new server process starts: forget the buffers the last one logged."""
        self.buffers.clear()

    def note(self, text: str) -> None:
        """A line from lalo itself (start, exit), marked so it stands out in the log."""
        if self._partial:
            self.write(b"\n")  # end the server's unfinished line first
        self.write(f"--- lalo: {text}\n".encode())

    def write(self, chunk: bytes) -> None:
        """Append output as it was read (any number of lines; one write and flush per chunk:
        this runs on the proxy's event loop for every line a server logs)."""
        if not chunk:
            return
        self._append(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next chunk
        self.tail.extend(line.decode("utf-8", errors="replace") for line in lines[-TAIL_LINES:])
        complete = data[: len(data) - len(self._partial)]  # a line is read once, when whole
        if b"buffer size" in complete:
            for raw, mib in _BUFFER.findall(complete):
                name = raw.decode().strip()
                size = int(float(mib) * 1024**2)
                # a sliding-window model logs one KV line for its global layers and one for
                # its window layers: the cache is both
                self.buffers[name] = self.buffers.get(name, 0) + size if " KV" in name else size

    def _append(self, chunk: bytes) -> None:
        """The chunk to the file. A write that fails (a full disk) never stops the reading: a
        reader that stopped would leave the server blocked on a full pipe, the model hung."""
        try:
            self.open()
            assert self._file is not None
            if self._size + len(chunk) > self.max_bytes:
                self._rotate()
                assert self._file is not None
            self._file.write(chunk)
            self._file.flush()
        except OSError as exc:
            if not self.lost:
                log.warning("cannot write %s (%s; %s): its lines are kept in memory only (the "
                            "last %d) until it can be written again", self.path, exc.strerror or exc,
                            _free(self.path.parent), TAIL_LINES)
            self.lost += len(chunk)
            self.close()  # the next chunk opens it again: the buffer keeps nothing half-written
            return
        self._size += len(chunk)
        if self.lost:
            log.warning("%s: written again; %s of output were lost", self.path,
                        format_size(self.lost))
            self.lost = 0

    def last_lines(self, count: int) -> list[str]:
        if count <= 0:
            return []
        return list(self.tail)[-count:]

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        if self.backups > 0 and self.path.exists():
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = self.path.open("wb")
        self._size = 0

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def read_tail(path: Path, count: int) -> list[str]:
    """The last `count` lines of a log file, reaching into rotated ones (.1, .2, ...) if needed."""
    lines: list[str] = []
    generation = 0
    while len(lines) < count:
        candidate = path if generation == 0 else path.with_name(f"{path.name}.{generation}")
        generation += 1
        if not candidate.exists():
            break
        with candidate.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            chunk = min(size, max(65536, count * 400))
            handle.seek(size - chunk)
            data = handle.read().decode("utf-8", errors="replace").splitlines()
            if chunk < size:
                data = data[1:]  # first line is probably cut
        lines = data[-(count - len(lines)):] + lines
    return lines[-count:] if count > 0 else []


def _free(directory: Path) -> str:
    try:
        return f"{format_size(shutil.disk_usage(directory).free)} free there"
    except OSError:
        return "free space unknown"
