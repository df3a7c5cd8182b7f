"""Restart policy: exponential backoff, and `failed` for good after repeated short-lived runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RestartPolicy:
    """Counts failures of runs that did not stay up `stable_after` seconds.

    `on_failure` returns the delay before the next start, or None once `max_failures`
    such failures happened in a row (the model is then failed until an explicit restart).
    """

    initial_delay: float = 1.0
    max_delay: float = 30.0
    max_failures: int = 5
    stable_after: float = 60.0
    failures: int = 0

    def on_failure(self, uptime: float | None) -> float | None:
        if uptime is not None and uptime >= self.stable_after:
            self.failures = 0  # it had been healthy for a while: a fresh problem
        self.failures += 1
        if self.failures >= self.max_failures:
            return None
        return float(min(self.max_delay, self.initial_delay * 2 ** (self.failures - 1)))

    def reset(self) -> None:
        self.failures = 0
