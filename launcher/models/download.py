"""One resumable download: a ranged GET with httpx onto the end of a partial file, taken up
again where it stopped when the connection drops mid-transfer, shown with huggingface_hub's
progress bar. huggingface_hub 2.x's own downloader deletes a partial file, so a pull
interrupted for good could not resume on the next run; this one keeps it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

# A public helper (listed in huggingface_hub.utils.__all__), exported lazily where mypy cannot see.
from huggingface_hub.utils import tqdm as hf_tqdm  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT = 30.0  # seconds without a byte before a transfer counts as dropped
DOWNLOAD_CHUNK = 1024**2
DOWNLOAD_RETRIES = 5  # reconnections within one pull, each resuming where the last stopped

ProgressCallback = Callable[[int, "int | None"], None]  # (bytes so far, total bytes)


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


def fetch(url: str, partial: Path, headers: dict[str, str], bar: ProgressBar) -> None:
    """GET `url` onto the end of `partial` (a Range request when it holds a prefix); a
    connection dropped mid-transfer is taken up again where it stopped, as long as bytes come.
    A server that ignores Range sends the whole file: the prefix is dropped."""
    retries = DOWNLOAD_RETRIES
    with httpx.Client(follow_redirects=True, timeout=DOWNLOAD_TIMEOUT) as client:
        while True:
            have = partial.stat().st_size if partial.exists() else 0
            ranged = {**headers, "Range": f"bytes={have}-"} if have else headers
            received = 0
            try:
                with client.stream("GET", url, headers=ranged) as response:
                    response.raise_for_status()
                    with partial.open("r+b" if partial.exists() else "wb") as out:
                        if have and response.status_code != 206:
                            out.truncate(0)
                            bar.update(-have)
                        else:
                            out.seek(have)
                        for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                            out.write(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
                return
            except httpx.TransportError:
                if not received or retries == 0:
                    raise
                retries -= 1
                log.warning("%s: connection dropped after %d bytes; resuming", url, received)
