"""Logs as server-sent events: a model server's log file followed like `tail -f`, and lalo's
own log records from an in-memory tail. Each event carries one or more lines (one `data:`
line each); a comment goes out every few seconds so proxies keep the stream open.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

from launcher.supervisor.logs import read_tail

FOLLOW_INTERVAL = 0.25  # seconds between looks at a log file for new bytes
KEEPALIVE = 10.0  # seconds between comments on a quiet stream
MAX_CHUNK = 256 * 1024  # bytes read from the file per look
CLOSING_CHECK = 0.5  # seconds between looks at whether lalo is stopping, on a quiet stream


def sse_lines(lines: list[str]) -> bytes:
    """One event holding these lines (a line break inside a line would end the field)."""
    body = "".join(f"data: {line.replace(chr(13), '')}\n" for line in lines)
    return (body + "\n").encode()


async def follow_file(path: Path, backlog: int, *, interval: float = FOLLOW_INTERVAL,
                      keepalive: float = KEEPALIVE, closing: asyncio.Event | None = None,
                      clock: Callable[[], float] = time.monotonic) -> AsyncGenerator[bytes, None]:
    """The last `backlog` lines, then new lines as they are written; survives rotation
    (the file replaced by a new one, or cut shorter). Ends when `closing` is set."""
    position, inode = _where(path)  # before the tail: a line written meanwhile comes twice
    recent = read_tail(path, backlog) if backlog else []
    yield sse_lines(recent) if recent else b": following\n\n"
    partial = b""
    quiet_since = clock()
    while closing is None or not closing.is_set():
        await asyncio.sleep(interval)
        size, current = _where(path)
        if current != inode or size < position:  # rotated: read the new file from its start
            position, inode, partial = 0, current, b""
        if size > position:
            with path.open("rb") as handle:
                handle.seek(position)
                data = handle.read(min(size - position, MAX_CHUNK))
            position += len(data)
            lines = (partial + data).split(b"\n")
            partial = lines.pop()
            if lines:
                quiet_since = clock()
                yield sse_lines([line.decode("utf-8", errors="replace") for line in lines])
        if clock() - quiet_since >= keepalive:
            quiet_since = clock()
            yield b": quiet\n\n"


def _where(path: Path) -> tuple[int, int]:
    try:
        stat = os.stat(path)
    except OSError:
        return 0, -1
    return stat.st_size, stat.st_ino


class LaloLog(logging.Handler):
    """lalo's own log records (the `launcher` loggers), kept in memory for the dashboard.

    Records may come from any thread; listeners are woken on their event loop.
    """

    def __init__(self, capacity: int = 1000) -> None:
        super().__init__(level=logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=capacity)
        self.sequence = 0
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)
            return
        for line in text.splitlines() or [""]:
            self.sequence += 1
            self.lines.append((self.sequence, line))
        for loop, event in list(self._waiters):
            loop.call_soon_threadsafe(event.set)

    def after(self, sequence: int) -> list[tuple[int, str]]:
        return [(number, line) for number, line in self.lines if number > sequence]

    async def follow(self, backlog: int, *, keepalive: float = KEEPALIVE,
                     closing: asyncio.Event | None = None) -> AsyncGenerator[bytes, None]:
        """The last `backlog` records, then new ones as they come; ends when `closing` is set."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        waiter = (loop, event)
        self._waiters.add(waiter)
        try:
            recent = list(self.lines)[-backlog:] if backlog else []
            yield sse_lines([line for _, line in recent]) if recent else b": following\n\n"
            seen = recent[-1][0] if recent else self.sequence
            quiet = 0.0
            while closing is None or not closing.is_set():
                try:
                    async with asyncio.timeout(CLOSING_CHECK):
                        await event.wait()
                except TimeoutError:
                    quiet += CLOSING_CHECK
                    if quiet >= keepalive:
                        quiet = 0.0
                        yield b": quiet\n\n"
                    continue
                quiet = 0.0
                event.clear()
                fresh = self.after(seen)
                if fresh:
                    seen = fresh[-1][0]
                    yield sse_lines([line for _, line in fresh])
        finally:
            self._waiters.discard(waiter)


_INSTALLED: LaloLog | None = None


def lalo_log() -> LaloLog:
    """The process's one LaloLog, attached to the `launcher` logger on first use."""
    global _INSTALLED
    if _INSTALLED is None:
        _INSTALLED = LaloLog()
        logger = logging.getLogger("launcher")
        logger.addHandler(_INSTALLED)
        root = logging.getLogger()
        if logger.getEffectiveLevel() > logging.INFO:
            # INFO records (state changes, reloads) reach this handler; the console handlers
            # keep showing what they showed before
            for handler in root.handlers:
                if handler.level == logging.NOTSET:
                    handler.setLevel(root.level)
            logger.setLevel(logging.INFO)
    return _INSTALLED
