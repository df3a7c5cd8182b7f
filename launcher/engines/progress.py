"""How an engine build reads on the console: the percentage, the time so far and an estimate of
the time left; on a terminal one status line rewritten in place, in a log a line every few percent
or seconds. Used by `lalo engine build` and by `lalo up` when it has to build llama-server.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:  # not imported at run time: `lalo up` loads this module on every start
    from launcher.engines.cmake import BuildProgress

Clock = Callable[[], float]
CLEAR = "\r\x1b[K"  # back to the line's start, erase it
LINE_STEP = 5  # percent between two plain lines
LINE_INTERVAL = 30.0  # seconds: a plain line at least this often while percentages come
# Before these, a rate says little: the first seconds of a resumed build race through targets
# that are already up to date, and a few percent can come from one small file.
SETTLE_DELAY = 3.0
ESTIMATE_AFTER = 20.0
ESTIMATE_GAIN = 3


class StatusOutput(Protocol):
    """Where progress goes: whole lines, and a status line a terminal shows in place."""

    @property
    def interactive(self) -> bool: ...

    def line(self, text: str) -> None: ...

    def status(self, text: str) -> None: ...

    def clear_status(self) -> None: ...


class ConsoleLines:
    """One stream written by several threads (`lalo up` pulls models while llama-server
    compiles): whole lines, and on a terminal one status line kept below them, erased before
    each line and drawn again after it, so that the two never run into each other."""

    def __init__(self, stream: TextIO | None = None, *, interactive: bool | None = None,
                 columns: Callable[[], int] | None = None) -> None:
        self._stream = stream
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self._columns = columns or (lambda: shutil.get_terminal_size((100, 20)).columns)
        self._status = ""
        self._lock = threading.Lock()

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def line(self, text: str) -> None:
        with self._lock:
            out = self.stream
            if self._status:
                out.write(CLEAR)
            out.write(text + "\n")
            if self._status:
                out.write(self._fit(self._status))
            out.flush()

    def status(self, text: str) -> None:
        """On a terminal, show `text` in place of the last status; elsewhere nothing."""
        if not self.interactive:
            return
        with self._lock:
            self._status = text
            self.stream.write(CLEAR + self._fit(text))
            self.stream.flush()

    def clear_status(self) -> None:
        with self._lock:
            if self._status:
                self.stream.write(CLEAR)
                self.stream.flush()
                self._status = ""

    def _fit(self, text: str) -> str:
        # a status longer than the terminal would wrap, and CLEAR erases only its last row
        return text[: max(self._columns() - 1, 10)]


class TimeLeft:
    """Seconds left to 100 %, from the rate of percentages since compiling started; None until
    that rate means something (ESTIMATE_AFTER seconds and ESTIMATE_GAIN percent measured)."""

    def __init__(self, *, settle: float = SETTLE_DELAY, after: float = ESTIMATE_AFTER,
                 gain: int = ESTIMATE_GAIN) -> None:
        self.settle = settle
        self.after = after
        self.gain = gain
        self._first: float | None = None
        self._anchor: tuple[float, int] | None = None  # (time, percent) the rate is taken from
        self._percent = 0

    def update(self, now: float, percent: int) -> None:
        if self._first is None:
            self._first = now
        if self._anchor is None or now - self._first < self.settle:
            self._anchor = (now, percent)
        self._percent = max(self._percent, percent)

    def seconds(self, now: float) -> float | None:
        if self._anchor is None:
            return None
        if self._percent >= 100:
            return 0.0
        since, start = self._anchor
        gained, elapsed = self._percent - start, now - since
        if elapsed < self.after or gained < self.gain:
            return None
        return (100 - self._percent) * elapsed / gained


class BuildProgressView:
    """BuildProgress events for people: stage messages as lines; compile percentages as the
    status line on a terminal, otherwise as a line every LINE_STEP percent or LINE_INTERVAL
    seconds, whichever comes first. `label` starts every line (`engine: ` in `lalo up`)."""

    def __init__(self, out: StatusOutput, *, label: str = "", clock: Clock = time.monotonic,
                 step: int = LINE_STEP, interval: float = LINE_INTERVAL) -> None:
        self.out = out
        self.label = label
        self.clock = clock
        self.step = step
        self.interval = interval
        self.eta = TimeLeft()
        self._started: float | None = None
        self._shown: tuple[float, int] | None = None  # the last plain line: (time, percent)

    def __call__(self, event: BuildProgress) -> None:
        if event.percent is None:
            self.out.line(f"{self.label}{event.stage}: {event.message}")
            return
        now = self.clock()
        if self._started is None:
            self._started = now
        self.eta.update(now, event.percent)
        text = f"{self.label}{self.describe(now, event.percent)}: {event.message}"
        if self.out.interactive:
            self.out.status(text)
        elif self._due(now, event.percent):
            self._shown = (now, event.percent)
            self.out.line(text)

    def describe(self, now: float, percent: int) -> str:
        """`[ 42%] 3m10s, about 4 min left`: the estimate only once there is one."""
        elapsed = now - (self._started if self._started is not None else now)
        text = f"[{percent:3d}%] {duration(elapsed)}"
        left = self.eta.seconds(now)
        if left is not None and percent < 100:
            text += f", {time_left(left)}"
        return text

    def _due(self, now: float, percent: int) -> bool:
        if self._shown is None:
            return True
        when, shown = self._shown
        if percent >= 100:
            return shown < 100
        # a line every interval even at the same percentage: a long step (the final link)
        # still shows the time passing
        return percent >= shown + self.step or now - when >= self.interval

    def close(self) -> None:
        self.out.clear_status()


def duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def time_left(seconds: float) -> str:
    if seconds < 60:
        return "under a minute left"
    return f"about {round(seconds / 60)} min left"
