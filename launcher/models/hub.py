"""Pulling GGUF files from the Hugging Face hub into its cache, verified before they are used.

huggingface_hub's public API does the hub's part (file metadata, auth headers, URLs, reading and
scanning its cache); the transfer itself (launcher/models/download.py) is a ranged GET into
the blob's `.incomplete` file, tried again from its length when the connection drops, and kept
between runs so a pull interrupted for good resumes (huggingface_hub 2.x's hf_hub_download
deletes a partial download). The sha256 is checked against the hub's LFS metadata and the
catalog pin *before* the blob and its snapshot link appear in the cache; hub exceptions are
mapped to HubError:

    HubError
    ├── HubNotFoundError          repository, revision or file does not exist (or needs a token)
    ├── HubOfflineError           offline or unreachable, and the file is not cached
    ├── DiskSpaceError            not enough free space for the download
    ├── DownloadInterruptedError  the transfer kept failing; the bytes received are kept
    └── IntegrityError            bytes do not match the expected sha256 (launcher.errors)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import httpx
from filelock import FileLock
from huggingface_hub import (
    CacheNotFound,
    get_hf_file_metadata,
    hf_hub_url,
    scan_cache_dir,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

# A public helper (listed in huggingface_hub.utils.__all__), exported lazily where mypy cannot see.
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

from launcher.digest import file_sha256
from launcher.errors import HubError, IntegrityError, UsageError
from launcher.models.download import (
    ProgressBar,
    ProgressCallback,
    RetryPolicy,
    fetch,
    is_transient,
    what_failed,
)
from launcher.units import format_size

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
HF_SCHEME = "hf://"
METADATA_TIMEOUT = 10.0
DISK_MARGIN = 64 * 1024**2  # keep this much free beyond the file itself
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TRUE = {"1", "on", "yes", "true"}

class _DiskSpace(Protocol):
    @property
    def free(self) -> int: ...


DiskUsage = Callable[[str], _DiskSpace]


class HubNotFoundError(HubError):
    """The repository, revision or file does not exist on the hub (or is private/gated)."""


class HubOfflineError(HubError):
    """The hub cannot be used (HF_HUB_OFFLINE, or unreachable) and the file is not cached."""


class DiskSpaceError(HubError):
    """Not enough free disk space in the cache for the download."""


class DownloadInterruptedError(HubError):
    """The transfer failed on every attempt (dropped, refused, 5xx); the partial file keeps what
    arrived, so the next pull resumes from there."""


@dataclass(frozen=True)
class HubFile:
    """One file in a hub repository at a revision, with what it must hash to when known."""

    repo: str
    filename: str
    revision: str = "main"
    sha256: str | None = None  # expected content hash (a catalog pin)
    size: int | None = None  # expected exact size in bytes

    @classmethod
    def parse(cls, ref: str, revision: str | None = None) -> HubFile:
        """`hf://owner/repo/path/file.gguf[@revision]` -> HubFile (UsageError if malformed);
        an explicit `revision` wins over the one in the reference."""
        if not ref.startswith(HF_SCHEME):
            raise UsageError(f"{ref!r} is not a hub reference (hf://owner/repo/file.gguf[@revision])")
        body = ref[len(HF_SCHEME) :]
        head, sep, rev = body.rpartition("@")
        if sep and "/" not in rev and rev:
            body = head
        else:
            rev = ""
        parts = [part for part in body.split("/") if part]
        if len(parts) < 3 or any(part in (".", "..") for part in parts):
            raise UsageError(f"{ref!r}: expected hf://owner/repo/file.gguf[@revision]")
        chosen = revision or rev or "main"
        return cls(repo=f"{parts[0]}/{parts[1]}", filename="/".join(parts[2:]), revision=chosen)

    @property
    def ref(self) -> str:
        return f"{HF_SCHEME}{self.repo}/{self.filename}@{self.revision}"


@dataclass(frozen=True)
class HubSettings:
    """Where the hub and its cache are; read from the environment huggingface_hub uses."""

    endpoint: str = DEFAULT_ENDPOINT
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "huggingface" / "hub")
    token: str | None = None
    offline: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HubSettings:
        """HF_ENDPOINT, HF_HUB_CACHE / HF_HOME / XDG_CACHE_HOME, HF_TOKEN and HF_HUB_OFFLINE,
        read at call time (huggingface_hub reads them once, at import)."""
        env = os.environ if environ is None else environ
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "huggingface",
        )
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
        offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").lower() in _TRUE
        return cls(
            endpoint=(env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
            cache_dir=Path(os.path.expandvars(os.path.expanduser(cache))),
            token=env.get("HF_TOKEN") or None,
            offline=offline,
        )


Source = Literal["downloaded", "cache", "offline-cache"]


@dataclass(frozen=True)
class PullResult:
    """Where the file is now and how it got there; `note` is a line worth showing the user."""

    file: HubFile
    path: Path
    commit: str
    size: int
    sha256: str | None
    source: Source
    note: str | None = None
    resumed_from: int = 0  # bytes an earlier, interrupted run had kept
    attempts: int = 0  # transfers this pull made (retries after a dropped connection included)


@dataclass(frozen=True)
class _Remote:
    url: str
    commit: str
    etag: str
    size: int | None


class HubClient:
    """Pulls into and reads from the huggingface_hub cache layout (blobs/, snapshots/, refs/).

    `settings` default to the environment at construction; `disk_usage` is shutil.disk_usage
    (a parameter so tests can make the disk look full); `retry` says how often a dropped
    transfer is taken up again within one pull, and how long to wait in between.
    """

    def __init__(
        self,
        settings: HubSettings | None = None,
        *,
        disk_usage: DiskUsage = shutil.disk_usage,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.settings = settings if settings is not None else HubSettings.from_env()
        self._disk_usage = disk_usage
        self._retry = retry if retry is not None else RetryPolicy()

    # --- cache layout ------------------------------------------------------------------
    def storage(self, file: HubFile) -> Path:
        return self.settings.cache_dir / ("models--" + file.repo.replace("/", "--"))

    def _pointer(self, file: HubFile, commit: str) -> Path:
        return self.storage(file) / "snapshots" / commit / Path(*file.filename.split("/"))

    def _cached_pointer(self, file: HubFile) -> Path | None:
        found = try_to_load_from_cache(
            file.repo, file.filename, cache_dir=self.settings.cache_dir, revision=file.revision
        )
        return Path(found) if isinstance(found, str) else None  # else None or "not at that commit"

    def cached_path(self, file: HubFile) -> Path | None:
        """The cached file for `file` (its snapshot link), or None; never touches the network.

        With a sha256 pin, a cached blob with another LFS hash is not this file.
        """
        pointer = self._cached_pointer(file)
        if pointer is None:
            return None
        if file.sha256 is not None and pointer.is_symlink():
            blob_name = Path(os.path.realpath(pointer)).name
            if _SHA256.match(blob_name) and blob_name != file.sha256:
                return None
        return pointer

    def partial_path(self, file: HubFile, etag: str) -> Path:
        return self.storage(file) / "blobs" / f"{etag}.incomplete"

    # --- pulling -------------------------------------------------------------------------
    def pull(
        self,
        file: HubFile,
        *,
        progress: ProgressCallback | None = None,
        show_progress: bool = False,
        verify_cached: bool = True,
        on_line: Callable[[str], None] | None = None,
    ) -> PullResult:
        """Make `file` present and verified in the cache, downloading what is missing.

        Offline, a cached copy is used (and said so); otherwise HubOfflineError. A cached copy
        is hashed again when `verify_cached` (a bad one is deleted and downloaded anew).
        A dropped transfer is resumed by itself; each retry is one line through `on_line`
        (default: above the progress bar on stderr when `show_progress`, else a log warning).
        """
        if self.settings.offline:
            return self._from_cache(file, "offline (HF_HUB_OFFLINE is set)", verify_cached)
        if _COMMIT.match(file.revision):
            # A commit is immutable: a cached copy needs no round trip to the hub.
            cached = self._verified_cached(file, file.revision, verify_cached)
            if cached is not None:
                return cached
        try:
            remote = self._metadata(file)
        except HubOfflineError as exc:
            return self._from_cache(file, str(exc), verify_cached)
        if remote.size is not None and file.size is not None and remote.size != file.size:
            raise IntegrityError(
                f"{file.ref}: the hub says {remote.size} bytes, the catalog pins {file.size}; not downloading"
            )
        if file.sha256 is not None and _SHA256.match(remote.etag) and remote.etag != file.sha256:
            raise IntegrityError(
                f"{file.ref}: the hub's LFS sha256 is {remote.etag}, the catalog pins "
                f"{file.sha256}; not downloading"
            )
        cached = self._verified_cached(file, remote.commit, verify_cached)
        if cached is not None:
            self._write_ref(file, remote.commit)
            return cached
        return self._download(
            file, remote, progress=progress, show_progress=show_progress, on_line=on_line
        )

    def _metadata(self, file: HubFile) -> _Remote:
        url = hf_hub_url(file.repo, file.filename, revision=file.revision, endpoint=self.settings.endpoint)
        try:
            meta = get_hf_file_metadata(
                url, token=self._token(), timeout=METADATA_TIMEOUT, endpoint=self.settings.endpoint
            )
        except GatedRepoError as exc:
            raise HubNotFoundError(
                f"{file.repo} is gated: accept its licence on the hub and set HF_TOKEN"
            ) from exc
        except RepositoryNotFoundError as exc:
            raise HubNotFoundError(
                f"repository {file.repo!r} not found on {self.settings.endpoint} "
                "(or it is private: set HF_TOKEN)"
            ) from exc
        except RevisionNotFoundError as exc:
            raise HubNotFoundError(f"revision {file.revision!r} not found in {file.repo}") from exc
        except RemoteEntryNotFoundError as exc:
            raise HubNotFoundError(
                f"file {file.filename!r} not found in {file.repo} at revision {file.revision}"
            ) from exc
        except OfflineModeIsEnabled as exc:
            raise HubOfflineError("offline (HF_HUB_OFFLINE is set)") from exc
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            if isinstance(status, int) and status >= 500:
                raise HubOfflineError(f"the hub at {self.settings.endpoint} answered HTTP {status}") from exc
            raise HubError(f"{file.ref}: the hub answered HTTP {status}") from exc
        except Exception as exc:  # the HTTP library's own errors: requests, httpx
            # or httpx2 depending on huggingface_hub's version; every one means "not reached"
            raise HubOfflineError(
                f"cannot reach the hub at {self.settings.endpoint} ({type(exc).__name__}: {exc})"
            ) from exc
        if not meta.commit_hash or not meta.etag:
            raise HubError(
                f"{url} answered without X-Repo-Commit/ETag: HF_ENDPOINT={self.settings.endpoint} "
                "does not look like a Hugging Face hub"
            )
        return _Remote(url=meta.location, commit=meta.commit_hash, etag=meta.etag, size=meta.size)

    def _token(self) -> str | bool | None:
        return self.settings.token if self.settings.token else None

    def _from_cache(self, file: HubFile, why: str, verify: bool) -> PullResult:
        pointer = self._cached_pointer(file)
        commit = pointer.relative_to(self.storage(file) / "snapshots").parts[0] if pointer else None
        cached = self._verified_cached(file, commit, verify) if commit else None
        if cached is None:
            raise HubOfflineError(
                f"{why}, and {file.ref} is not in the cache at {self.settings.cache_dir}; "
                "pull it where the hub can be reached (or copy that cache here)"
            )
        return PullResult(
            file=file,
            path=cached.path,
            commit=cached.commit,
            size=cached.size,
            sha256=cached.sha256,
            source="offline-cache",
            note=f"{why}: using the cached copy",
        )

    def _verified_cached(self, file: HubFile, commit: str, verify: bool) -> PullResult | None:
        pointer = self._pointer(file, commit)
        if not pointer.exists():
            return None
        digest: str | None = None
        if verify:
            digest = file_sha256(pointer)
            # The blob's name is its LFS sha256: bytes that do not hash to it are damaged.
            # Without that name (a copy where symlinks are not allowed) only a pin can tell.
            content = _lfs_name(pointer) or file.sha256
            if content is not None and digest != content:
                log.warning(
                    "%s: cached copy is damaged (sha256 %s, expected %s): deleting it",
                    file.ref,
                    digest,
                    content,
                )
                _discard(Path(os.path.realpath(pointer)), pointer)
                return None
            if file.sha256 is not None and digest != file.sha256:
                raise IntegrityError(
                    f"{file.ref}: the cached file has sha256 {digest}, the catalog pins "
                    f"{file.sha256}: the catalog and the repository disagree"
                )
        return PullResult(
            file=file,
            path=pointer,
            commit=commit,
            size=pointer.stat().st_size,
            sha256=digest,
            source="cache",
        )

    def _download(
        self,
        file: HubFile,
        remote: _Remote,
        *,
        progress: ProgressCallback | None,
        show_progress: bool,
        on_line: Callable[[str], None] | None,
    ) -> PullResult:
        storage = self.storage(file)
        blobs = storage / "blobs"
        blob = blobs / remote.etag
        pointer = self._pointer(file, remote.commit)
        lock = self.settings.cache_dir / ".locks" / storage.name / f"{remote.etag}.lock"  # as the hub's
        blobs.mkdir(parents=True, exist_ok=True)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(lock):
            partial = self.partial_path(file, remote.etag)
            have = partial.stat().st_size if partial.exists() else 0
            if remote.size is not None and have > remote.size:
                partial.unlink()  # longer than the file: not a prefix of it
                have = 0
            self._check_disk(file, blobs, (remote.size or 0) - have)
            headers = build_hf_headers(token=self._token())
            if not _same_origin(remote.url, self.settings.endpoint):
                headers.pop("authorization", None)  # signed CDN URL: the token stays on the hub
            if have:
                log.info("%s: resuming at byte %d", file.ref, have)
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
                    attempts = fetch(
                        remote.url, partial, headers, bar, total=remote.size, retry=self._retry,
                        on_retry=lambda retry: say(f"{file.ref}: {retry.describe()}"),
                    )
                except httpx.HTTPError as exc:
                    raise self._interrupted(file, remote, partial, exc) from exc
                except OSError as exc:  # writing the partial file: not worth retrying
                    raise HubError(
                        f"{file.ref}: download stopped after {_size_of(partial)} of "
                        f"{format_size(remote.size)}: cannot write {partial} ({exc}); once it "
                        f"can be written, run the pull again to resume (lalo models pull {file.ref})"
                    ) from exc
            digest = file_sha256(partial)
            size = partial.stat().st_size
            expected = [value for value in (file.sha256, _sha_or_none(remote.etag)) if value]
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
            os.chmod(partial, 0o644)
            os.replace(partial, blob)
            _link(blob, pointer)
            self._write_ref(file, remote.commit)
        return PullResult(
            file=file,
            path=pointer,
            commit=remote.commit,
            size=size,
            sha256=digest,
            source="downloaded",
            resumed_from=have,
            attempts=attempts,
        )

    def _interrupted(self, file: HubFile, remote: _Remote, partial: Path, exc: httpx.HTTPError) -> HubError:
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
            f"{file.ref}: download interrupted after {got} in {self._retry.attempts} attempts "
            f"(last: {what_failed(exc)}){kept}; {again}"
        )

    def _check_disk(self, file: HubFile, directory: Path, needed: int) -> None:
        free = self._disk_usage(str(directory)).free
        if needed + DISK_MARGIN > free:
            raise DiskSpaceError(
                f"{file.ref}: not enough disk space: needs {format_size(needed)} (+"
                f"{format_size(DISK_MARGIN)} margin), {format_size(free)} free in {directory}"
            )

    def _write_ref(self, file: HubFile, commit: str) -> None:
        if file.revision == commit:
            return
        ref = self.storage(file) / "refs" / file.revision
        try:
            if ref.is_file() and ref.read_text(encoding="utf-8") == commit:
                return
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
            tmp.write_text(commit, encoding="utf-8")
            os.replace(tmp, ref)
        except OSError as exc:  # a read-only cache still serves what it has
            log.warning("cannot record %s -> %s: %s", file.revision, commit, exc)

    def cached_files(self, suffix: str = ".gguf") -> list[tuple[HubFile, Path]]:
        """Every cached model file ending in `suffix`, as (repo/file@commit, snapshot path)."""
        found = [
            (HubFile(repo=repo.repo_id, filename=name, revision=revision.commit_hash), path)
            for repo, revision, name, path in self._scan()
            if name.endswith(suffix)
        ]
        return sorted(found, key=lambda item: (item[0].repo, str(item[1])))

    def _scan(self) -> list[tuple[Any, Any, str, Path]]:
        """(repo, revision, file name in the repo, snapshot path) of every cached model file,
        from huggingface_hub's cache scan; repositories it finds damaged are logged."""
        try:
            info = scan_cache_dir(self.settings.cache_dir)
        except CacheNotFound:
            return []
        for warning in info.warnings:
            log.warning("hub cache: %s", warning)
        return [
            (repo, revision, cached.file_path.relative_to(revision.snapshot_path).as_posix(),
             cached.file_path)
            for repo in info.repos if repo.repo_type == "model"
            for revision in repo.revisions
            for cached in revision.files
        ]

    # --- removing ------------------------------------------------------------------------
    def remove(self, file: HubFile) -> list[Path]:
        """Delete `file` from the cache at every cached commit: snapshot links, blobs no other
        link uses, and partial downloads. Returns what was deleted."""
        entries = [entry for entry in self._scan() if entry[0].repo_id == file.repo]
        chosen = [path for _, _, name, path in entries if name == file.filename]
        blobs = {Path(os.path.realpath(path)) for path in chosen}
        still_used = {Path(os.path.realpath(path)) for _, _, name, path in entries
                      if name != file.filename}
        snapshots = self.storage(file) / "snapshots"
        removed: list[Path] = []
        for pointer in chosen:
            pointer.unlink()
            removed.append(pointer)
            _prune_empty(pointer.parent, stop=snapshots)
        for blob in sorted(blobs - still_used):
            if blob.is_file() and blob.parent.name == "blobs":
                blob.unlink()
                removed.append(blob)
                partial = blob.with_name(blob.name + ".incomplete")
                if partial.exists():
                    partial.unlink()
                    removed.append(partial)
        return removed


def _sha_or_none(etag: str) -> str | None:
    # An LFS file's ETag is its sha256; a small git file's is a git sha1 (not a content hash).
    return etag if _SHA256.match(etag) else None


def _lfs_name(pointer: Path) -> str | None:
    if not pointer.is_symlink():
        return None
    return _sha_or_none(Path(os.path.realpath(pointer)).name)


def _size_of(path: Path) -> str:
    try:
        return format_size(path.stat().st_size)
    except OSError:
        return format_size(0)


def _same_origin(url: str, endpoint: str) -> bool:
    a, b = urlsplit(url), urlsplit(endpoint)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def _link(blob: Path, pointer: Path) -> None:
    """The snapshot entry for `blob`: a relative symlink, or the file itself where symlinks
    are not allowed (Windows without developer mode), as huggingface_hub does."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    except OSError:
        os.replace(blob, pointer)


def _discard(blob: Path, pointer: Path) -> None:
    for path in (pointer, blob):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _prune_empty(directory: Path, *, stop: Path) -> None:
    while directory != stop and directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
        directory = directory.parent
