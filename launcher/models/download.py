"""One resumable download: a ranged GET with httpx onto the end of a partial file, tried again
from the bytes on disk when the connection drops (a few times, with backoff), shown with
huggingface_hub's progress bar. huggingface_hub 2.x's own downloader deletes a partial file, so
a pull interrupted for good could not resume on the next run; this one keeps it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

# A public helper (listed in huggingface_hub.utils.__all__), exported lazily where mypy cannot see.
from huggingface_hub.utils import tqdm as hf_tqdm  # type: ignore[attr-defined]

from launcher.units import format_size

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT = 30.0  # seconds without a byte before a transfer counts as dropped
# Statuses a CDN answers while it is briefly unwell; any other 4xx will not change by retrying.
_TRANSIENT_STATUS = frozenset({408, 429})

ProgressCallback = Callable[[int, "int | None"], None]  # (bytes so far, total bytes)


@dataclass(frozen=True)
class RetryPolicy:
    """How many transfers one pull tries, and how long it waits before each retry: 1, 2, 4, 8 s
    by default (doubling, at most `max_delay`). `sleep` is a parameter so tests need not wait."""

    attempts: int = 5
    first_delay: float = 1.0
    max_delay: float = 30.0
    sleep: Callable[[float], None] = time.sleep

    def delay(self, failed: int) -> float:
        """Seconds to wait after the `failed`-th attempt (1-based) failed."""
        return float(min(self.first_delay * 2 ** (failed - 1), self.max_delay))


@dataclass(frozen=True)
class Retry:
    """A transfer failed and is about to be tried again from the `kept` bytes on disk."""

    kept: int
    total: int | None
    attempt: int  # the attempt about to start, 2..attempts
    attempts: int
    delay: float
    error: httpx.HTTPError

    def describe(self) -> str:
        """`connection dropped after 657 KiB of 1.28 MiB; resuming from 657 KiB in 1 s (attempt
        2 of 5)`: the sizes are the bytes on disk, where the next request's Range starts."""
        kept = format_size(self.kept)
        at = kept if self.total is None else f"{kept} of {format_size(self.total)}"
        return (
            f"{what_failed(self.error)} after {at}; resuming from {kept} in {self.delay:g} s "
            f"(attempt {self.attempt} of {self.attempts})"
        )


RetryCallback = Callable[[Retry], None]


class ProgressBar(hf_tqdm):
    """huggingface_hub's download bar (it honours HF_HUB_DISABLE_PROGRESS_BARS), also
    reporting (bytes so far, total) to a callback."""

    def __init__(self, *args: Any, callback: ProgressCallback | None = None, **kwargs: Any) -> None:
        self._callback = callback
        self._done = int(kwargs.get("initial") or 0)
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        if callback is not None:
            callback(self._done, self.total)

    def update(self, n: float | None = 1) -> bool | None:
        step = int(n or 0)
        self._done += step
        if self._callback is not None:
            self._callback(self._done, self.total)
        result: bool | None = super().update(n)
        return result


def is_transient(error: BaseException) -> bool:
    """Whether trying the transfer again may succeed: the connection failed (refused, dropped
    mid-body, no byte for DOWNLOAD_TIMEOUT) or the server answered 5xx, 408 or 429."""
    if isinstance(error, httpx.HTTPStatusError):
        status = error.response.status_code
        return status >= 500 or status in _TRANSIENT_STATUS
    return isinstance(error, httpx.TransportError)


def what_failed(error: httpx.HTTPError) -> str:
    """A transfer's failure in a few words; httpx's own text counts the bytes of that one
    response, which read as wrong beside the file's totals."""
    if isinstance(error, httpx.HTTPStatusError):
        return f"HTTP {error.response.status_code} from the download server"
    if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
        return f"cannot connect to the download server ({type(error).__name__})"
    if isinstance(error, httpx.TimeoutException):
        return f"no data for {DOWNLOAD_TIMEOUT:.0f} s"
    if isinstance(error, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return "connection dropped"
    return f"{type(error).__name__}: {error}"


def fetch(
    url: str,
    partial: Path,
    headers: dict[str, str],
    bar: ProgressBar,
    *,
    total: int | None = None,
    retry: RetryPolicy | None = None,
    on_retry: RetryCallback | None = None,
) -> int:
    """GET `url` onto the end of `partial` (a Range request when it holds a prefix) until it
    holds `total` bytes (or the server's whole answer); returns the attempts it took.

    A transient failure (`is_transient`) is tried again from the bytes on disk, up to
    `retry.attempts` transfers, `on_retry` told before each wait; the last failure is raised
    and `partial` keeps every byte received. A server that ignores Range sends the whole file:
    the prefix is dropped."""
    policy = retry if retry is not None else RetryPolicy()
    with httpx.Client(follow_redirects=True, timeout=DOWNLOAD_TIMEOUT) as client:
        attempt = 1
        while True:
            try:
                _transfer(client, url, partial, headers, bar, total)
                return attempt
            except httpx.HTTPError as exc:
                if not is_transient(exc) or attempt >= policy.attempts:
                    raise
                delay = policy.delay(attempt)
                attempt += 1
                kept = _size(partial)
                log.info("%s: %s at byte %d; attempt %d in %.0f s", url, type(exc).__name__, kept,
                         attempt, delay)
                if on_retry is not None:
                    on_retry(Retry(kept, total, attempt, policy.attempts, delay, exc))
                policy.sleep(delay)


def _transfer(
    client: httpx.Client,
    url: str,
    partial: Path,
    headers: dict[str, str],
    bar: ProgressBar,
    total: int | None,
) -> None:
    have = _size(partial)
    if total is not None and have == total:
        return  # a complete file an earlier run did not get to verify: a Range would be 416
    # Range counts bytes of the file as stored: a compressed answer would count something else.
    ranged = {**headers, "Accept-Encoding": "identity"}
    if have:
        ranged["Range"] = f"bytes={have}-"
    with client.stream("GET", url, headers=ranged) as response:
        response.raise_for_status()
        with partial.open("r+b" if partial.exists() else "wb") as out:
            if have and response.status_code != 206:
                out.truncate(0)
                bar.update(-have)
            else:
                out.seek(have)
            # iter_raw hands over each read as it arrives. iter_bytes(chunk_size) would hold up
            # to a chunk in memory, and a connection dropped before it filled lost those bytes
            # (a 1 MiB chunk kept nothing of a 1.28 MiB file cut halfway).
            for chunk in response.iter_raw():
                out.write(chunk)
                bar.update(len(chunk))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
