"""The retry rules of a hub download (launcher/models/download.py): which failures are tried
again, how long it waits, and the line it says; the transfers themselves are tested against a
real server in tests/integration/test_hub.py."""

from __future__ import annotations

import httpx
import pytest

from launcher.models.download import DOWNLOAD_TIMEOUT, Retry, RetryPolicy, is_transient

REQUEST = httpx.Request("GET", "http://cdn.invalid/blob")


def status_error(status: int) -> httpx.HTTPStatusError:
    return httpx.HTTPStatusError("x", request=REQUEST, response=httpx.Response(status, request=REQUEST))


def test_backoff_doubles_from_one_second_up_to_a_cap() -> None:
    policy = RetryPolicy()
    assert policy.attempts == 5
    assert [policy.delay(n) for n in range(1, 5)] == [1.0, 2.0, 4.0, 8.0]
    assert RetryPolicy(max_delay=3.0).delay(4) == 3.0


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (httpx.RemoteProtocolError("peer closed connection", request=REQUEST), True),
        (httpx.ReadError("connection reset", request=REQUEST), True),
        (httpx.ReadTimeout("timed out", request=REQUEST), True),
        (httpx.ConnectError("refused", request=REQUEST), True),
        (status_error(503), True),
        (status_error(429), True),
        (status_error(403), False),  # an expired signed URL stays expired
        (status_error(404), False),
        (status_error(416), False),
        (OSError("No space left on device"), False),
    ],
)
def test_what_is_tried_again(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_the_retry_line_names_true_sizes_and_the_attempt() -> None:
    dropped = httpx.RemoteProtocolError("peer closed connection", request=REQUEST)
    retry = Retry(kept=672_720, total=1_345_440, attempt=2, attempts=5, delay=1.0, error=dropped)
    assert retry.describe() == (
        "connection dropped after 657 KiB of 1.28 MiB; resuming from 657 KiB in 1 s (attempt 2 of 5)"
    )
    busy = Retry(kept=0, total=None, attempt=3, attempts=5, delay=2.0, error=status_error(503))
    assert busy.describe() == (
        "HTTP 503 from the download server after 0 B; resuming from 0 B in 2 s (attempt 3 of 5)"
    )
    stalled = Retry(kept=1024, total=2048, attempt=4, attempts=5, delay=4.0,
                    error=httpx.ReadTimeout("timed out", request=REQUEST))
    assert stalled.describe().startswith(f"no data for {DOWNLOAD_TIMEOUT:.0f} s after 1.00 KiB of 2.00 KiB")
