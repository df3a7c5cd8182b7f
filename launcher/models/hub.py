"""Pulling GGUF files from the Hugging Face hub into its cache, verified before they are used,
and reading and pruning that cache (blobs/, snapshots/, refs/ as huggingface_hub lays it out).

A pull asks the hub (launcher/models/hub_remote.py) only when the cache cannot answer alone, and
downloads through launcher/models/hub_transfer.py, which resumes what an interrupted pull kept
(huggingface_hub 2.x's hf_hub_download deletes a partial download). The files, settings and
errors it speaks of are in launcher/models/hub_file.py.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import CacheNotFound, scan_cache_dir, try_to_load_from_cache

from launcher.digest import file_sha256
from launcher.errors import IntegrityError
from launcher.models.download import ProgressCallback, RetryPolicy
from launcher.models.hub_file import DiskUsage, HubFile, HubOfflineError, HubSettings, PullResult
from launcher.models.hub_remote import RemoteFile, remote_file
from launcher.models.hub_transfer import SHA256, Destination, Transfer, sha_or_none

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


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
        self._transfer = Transfer(self.settings, disk_usage,
                                  retry if retry is not None else RetryPolicy())

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
            if SHA256.match(blob_name) and blob_name != file.sha256:
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
            remote = remote_file(file, self.settings)
        except HubOfflineError as exc:
            return self._from_cache(file, str(exc), verify_cached)
        if remote.size is not None and file.size is not None and remote.size != file.size:
            raise IntegrityError(
                f"{file.ref}: the hub says {remote.size} bytes, the catalog pins {file.size}; not downloading"
            )
        if file.sha256 is not None and SHA256.match(remote.etag) and remote.etag != file.sha256:
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
        remote: RemoteFile,
        *,
        progress: ProgressCallback | None,
        show_progress: bool,
        on_line: Callable[[str], None] | None,
    ) -> PullResult:
        storage = self.storage(file)
        where = Destination(
            blob=storage / "blobs" / remote.etag,
            partial=self.partial_path(file, remote.etag),
            pointer=self._pointer(file, remote.commit),
            lock=self.settings.cache_dir / ".locks" / storage.name / f"{remote.etag}.lock",  # as the hub's
        )
        done = self._transfer.download(file, remote, where, progress=progress,
                                       show_progress=show_progress, on_line=on_line)
        self._write_ref(file, remote.commit)
        return PullResult(
            file=file,
            path=where.pointer,
            commit=remote.commit,
            size=done.size,
            sha256=done.sha256,
            source="downloaded",
            resumed_from=done.resumed_from,
            attempts=done.attempts,
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


def _lfs_name(pointer: Path) -> str | None:
    if not pointer.is_symlink():
        return None
    return sha_or_none(Path(os.path.realpath(pointer)).name)


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
