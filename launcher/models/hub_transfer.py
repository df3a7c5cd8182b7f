"""One hub file's bytes into the cache: a ranged GET (launcher/models/download.py) into the blob's
`.incomplete` file, taken up again from its length when the connection drops and kept between
runs, then checked against the expected sha256 and size *before* it is renamed into the blob and
linked from the snapshot. Failures are HubError (launcher/models/hub_file.py)."""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from filelock import FileLock

from launcher.digest import file_sha256
from launcher.errors import HubError, IntegrityError
from launcher.models.download import (
    ProgressBar,
    ProgressCallback,
    RetryPolicy,
    fetch,
    is_transient,
    what_failed,
)
from launcher.models.hub_file import (
    DISK_MARGIN,
    DiskSpaceError,
    DiskUsage,
    DownloadInterruptedError,
    HubFile,
    HubSettings,
)
from launcher.models.hub_remote import RemoteFile, download_headers
from launcher.units import format_size

log = logging.getLogger(__name__)

SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Destination:
    """Where one download goes in the hub's cache layout (HubClient names the paths)."""

    blob: Path
    partial: Path  # the blob's `.incomplete` file: what earlier runs kept
    pointer: Path  # the snapshot entry
    lock: Path


@dataclass(frozen=True)
class Transferred:
    size: int
    sha256: str
    resumed_from: int  # bytes an earlier, interrupted run had kept
    attempts: int  # transfers made (retries after a dropped connection included)


@dataclass(frozen=True)
class Transfer:
    """Downloads hub files; `disk_usage` is shutil.disk_usage, `retry` how often a dropped
    transfer is taken up again within one pull and how long to wait in between."""

    settings: HubSettings
    disk_usage: DiskUsage
    retry: RetryPolicy

    def download(
        self,
        file: HubFile,
        remote: RemoteFile,
        where: Destination,
        *,
        progress: ProgressCallback | None,
        show_progress: bool,
        on_line: Callable[[str], None] | None,
    ) -> Transferred:
        """The blob in place and linked, verified; one transfer at a time per blob (the
        hub's own lock file, so huggingface_hub waits for it too)."""
        where.blob.parent.mkdir(parents=True, exist_ok=True)
        where.lock.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(where.lock):
            partial = where.partial
            have = partial.stat().st_size if partial.exists() else 0
            if remote.size is not None and have > remote.size:
                partial.unlink()  # longer than the file: not a prefix of it
                have = 0
            self._check_disk(file, where.blob.parent, (remote.size or 0) - have)
            if have:
                log.info("%s: resuming at byte %d", file.ref, have)
            attempts = self._fetch(file, remote, partial, have, progress=progress,
                                   show_progress=show_progress, on_line=on_line)
            digest = file_sha256(partial)
            size = partial.stat().st_size
            _verify(file, remote, partial, digest, size, have, attempts)
            os.chmod(partial, 0o644)
            os.replace(partial, where.blob)
            link(where.blob, where.pointer)
        return Transferred(size=size, sha256=digest, resumed_from=have, attempts=attempts)

    def _fetch(
        self,
        file: HubFile,
        remote: RemoteFile,
        partial: Path,
        have: int,
        *,
        progress: ProgressCallback | None,
        show_progress: bool,
        on_line: Callable[[str], None] | None,
    ) -> int:
        """The bytes after `have` appended to `partial`, behind a progress bar; the attempts."""
        headers = download_headers(remote.url, self.settings)
        with ProgressBar(
            callback=progress, disable=not show_progress, file=sys.stderr, total=remote.size,
            initial=have, unit="B", unit_scale=True, unit_divisor=1024,
            desc=Path(file.filename).name, mininterval=0.5 if sys.stderr.isatty() else 5.0,
        ) as bar:
            say = on_line
            if say is None:
                # tqdm.write clears the bar, prints the line above it and draws it again.
                say = (lambda line: bar.write(line, file=sys.stderr)) if show_progress else log.warning
            try:
                return fetch(
                    remote.url, partial, headers, bar, total=remote.size, retry=self.retry,
                    on_retry=lambda retry: say(f"{file.ref}: {retry.describe()}"),
                )
            except httpx.HTTPError as exc:
                raise self._interrupted(file, remote, partial, exc) from exc
            except OSError as exc:  # writing the partial file: not worth retrying
                if exc.errno == errno.ENOSPC:
                    raise self._disk_full(file, remote, partial) from exc
                raise HubError(
                    f"{file.ref}: download stopped after {_size_of(partial)} of "
                    f"{format_size(remote.size)}: cannot write {partial} ({exc}); once it "
                    f"can be written, run the pull again to resume (lalo models pull {file.ref})"
                ) from exc

    def _interrupted(self, file: HubFile, remote: RemoteFile, partial: Path,
                     exc: httpx.HTTPError) -> HubError:
        """The error for a transfer that failed for good; what stays in `partial` is resumed
        by the next pull (unless the server refused its length as a start)."""
        got = f"{_size_of(partial)} of {format_size(remote.size)}"
        again = f"run the pull again to resume (lalo models pull {file.ref})"
        if isinstance(exc, httpx.HTTPStatusError):
            status = exc.response.status_code
            if status == 416:
                partial.unlink(missing_ok=True)  # our prefix does not fit the file: start over
                return HubError(
                    f"{file.ref}: the download server refused to resume at {got} (HTTP 416); the "
                    f"partial file was deleted: run the pull again to start over"
                )
            if not is_transient(exc):
                return HubError(f"{file.ref}: download failed with HTTP {status} after {got}; {again}")
        kept = f"; {_size_of(partial)} kept in {partial}" if partial.exists() else ""
        return DownloadInterruptedError(
            f"{file.ref}: download interrupted after {got} in {self.retry.attempts} attempts "
            f"(last: {what_failed(exc)}){kept}; {again}"
        )

    def _disk_full(self, file: HubFile, remote: RemoteFile, partial: Path) -> DiskSpaceError:
        """The disk filled during the transfer (another writer, or a size the hub did not
        say): what is kept stays `.incomplete`, never at the blob's name, for the next pull."""
        have = partial.stat().st_size if partial.exists() else 0
        needed = f"{format_size(remote.size - have)} more" if remote.size is not None else "more"
        try:
            free = format_size(self.disk_usage(str(partial.parent)).free)
        except OSError:
            free = "an unknown amount"
        return DiskSpaceError(
            f"{file.ref}: the disk filled up during the download: needs {needed} "
            f"(+{format_size(DISK_MARGIN)} margin), {free} free in {partial.parent}; "
            f"{format_size(have)} of {format_size(remote.size)} kept in {partial}; once there is "
            f"room, run the pull again to resume (lalo models pull {file.ref})"
        )

    def _check_disk(self, file: HubFile, directory: Path, needed: int) -> None:
        free = self.disk_usage(str(directory)).free
        if needed + DISK_MARGIN > free:
            raise DiskSpaceError(
                f"{file.ref}: not enough disk space: needs {format_size(needed)} (+"
                f"{format_size(DISK_MARGIN)} margin), {format_size(free)} free in {directory}"
            )


def _verify(file: HubFile, remote: RemoteFile, partial: Path, digest: str, size: int, have: int,
            attempts: int) -> None:
    """IntegrityError (and the partial file deleted) unless the bytes are what the catalog pin
    and the hub's LFS sha256 and size say."""
    expected = [value for value in (file.sha256, sha_or_none(remote.etag)) if value]
    if any(digest != value for value in expected) or (
        remote.size is not None and size != remote.size
    ):
        partial.unlink(missing_ok=True)
        # A resumed file joins bytes from several transfers: say so, the next pull
        # starts from zero.
        resumed = (
            f" (resumed from {format_size(have)} an earlier pull had kept)" if have
            else f" (in {attempts} transfers)" if attempts > 1 else ""
        )
        raise IntegrityError(
            f"{file.ref}: downloaded bytes{resumed} have sha256 {digest} ({size} bytes), "
            f"expected {' and '.join(sorted(set(expected)))}"
            f"{f' ({remote.size} bytes)' if remote.size is not None else ''}; "
            "the download was deleted: the next pull starts over"
        )


def sha_or_none(etag: str) -> str | None:
    # An LFS file's ETag is its sha256; a small git file's is a git sha1 (not a content hash).
    return etag if SHA256.match(etag) else None


def _size_of(path: Path) -> str:
    try:
        return format_size(path.stat().st_size)
    except OSError:
        return format_size(0)


def link(blob: Path, pointer: Path) -> None:
    """The snapshot entry for `blob`: a relative symlink, or the file itself where symlinks
    are not allowed (Windows without developer mode), as huggingface_hub does."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    except OSError:
        os.replace(blob, pointer)
