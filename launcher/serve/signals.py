"""The signals `lalo up` answers: the handlers only pass the signal on; the runner acts on it
in its own coroutine (SIGINT and SIGTERM: stop, SIGHUP: reload). Windows has no handlers here:
Ctrl+C arrives as KeyboardInterrupt."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

EXIT_INTERRUPTED = 130


class Signals:
    """Installs the handlers on the running loop and removes them again (`remove` is safe twice)."""

    def __init__(self, on_stop: Callable[[int], None], on_hangup: Callable[[], None]) -> None:
        self.on_stop = on_stop  # called with the exit code: 130 for Ctrl+C, 0 for SIGTERM
        self.on_hangup = on_hangup

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, self.on_stop, EXIT_INTERRUPTED)
            loop.add_signal_handler(signal.SIGTERM, self.on_stop, 0)
        if hasattr(signal, "SIGHUP"):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signal.SIGHUP, self.on_hangup)

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)
            loop.remove_signal_handler(signal.SIGHUP)
