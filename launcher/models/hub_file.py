"""What a hub pull talks about: a file on the Hugging Face hub (`hf://owner/repo/file@revision`),
the hub's settings read from the environment huggingface_hub uses, what a pull returns, and the
pull's errors:

    HubError
    ├── HubNotFoundError          repository, revision or file does not exist (or needs a token)
    ├── HubOfflineError           offline or unreachable, and the file is not cached
    ├── DiskSpaceError            not enough free space for the download
    ├── DownloadInterruptedError  the transfer kept failing; the bytes received are kept
    └── IntegrityError            bytes do not match the expected sha256 (launcher.errors)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from launcher.errors import HubError, UsageError

DEFAULT_ENDPOINT = "https://huggingface.co"
HF_SCHEME = "hf://"
DISK_MARGIN = 64 * 1024**2  # keep this much free beyond the file itself
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
