"""The hub's side of a pull: one metadata request (huggingface_hub's get_hf_file_metadata) for a
file at a revision, its exceptions mapped to HubError, and whether a download URL is the hub's own
(the token is sent there only, not to a signed CDN URL)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from huggingface_hub import get_hf_file_metadata, hf_hub_url
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

from launcher.errors import HubError
from launcher.models.hub_file import HubFile, HubNotFoundError, HubOfflineError, HubSettings

METADATA_TIMEOUT = 10.0


@dataclass(frozen=True)
class RemoteFile:
    """The hub's answer for one file: download URL, commit, ETag and size (None: unknown)."""

    url: str
    commit: str
    etag: str
    size: int | None


def remote_file(file: HubFile, settings: HubSettings) -> RemoteFile:
    """What the hub says of `file` (HEAD, redirects followed): where to download it, the commit
    the revision names and the ETag (an LFS file's sha256); hub exceptions mapped to HubError."""
    url = hf_hub_url(file.repo, file.filename, revision=file.revision, endpoint=settings.endpoint)
    try:
        meta = get_hf_file_metadata(
            url, token=settings.token or None, timeout=METADATA_TIMEOUT, endpoint=settings.endpoint
        )
    except GatedRepoError as exc:
        raise HubNotFoundError(
            f"{file.repo} is gated: accept its licence on the hub and set HF_TOKEN"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise HubNotFoundError(
            f"repository {file.repo!r} not found on {settings.endpoint} "
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
            raise HubOfflineError(f"the hub at {settings.endpoint} answered HTTP {status}") from exc
        raise HubError(f"{file.ref}: the hub answered HTTP {status}") from exc
    except Exception as exc:  # the HTTP library's own errors: requests, httpx
        # or httpx2 depending on huggingface_hub's version; every one means "not reached"
        raise HubOfflineError(
            f"cannot reach the hub at {settings.endpoint} ({type(exc).__name__}: {exc})"
        ) from exc
    if not meta.commit_hash or not meta.etag:
        raise HubError(
            f"{url} answered without X-Repo-Commit/ETag: HF_ENDPOINT={settings.endpoint} "
            "does not look like a Hugging Face hub"
        )
    return RemoteFile(url=meta.location, commit=meta.commit_hash, etag=meta.etag, size=meta.size)


def same_origin(url: str, endpoint: str) -> bool:
    a, b = urlsplit(url), urlsplit(endpoint)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def download_headers(url: str, settings: HubSettings) -> dict[str, str]:
    """The hub's request headers (user agent, token) for downloading `url`."""
    headers: dict[str, str] = build_hf_headers(token=settings.token or None)
    if not same_origin(url, settings.endpoint):
        headers.pop("authorization", None)  # signed CDN URL: the token stays on the hub
    return headers
