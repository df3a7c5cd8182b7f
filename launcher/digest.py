"""sha256 of files, read in blocks (models are gigabytes), with optional progress."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

_BLOCK = 1 << 20


def file_sha256(path: Path, progress: Callable[[int, int], None] | None = None) -> str:
    """Hex sha256 of `path`; `progress(done, total)` after each block if given."""
    digest = hashlib.sha256()
    total = path.stat().st_size if progress is not None else 0
    done = 0
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(_BLOCK), b""):
            digest.update(block)
            if progress is not None:
                done += len(block)
                progress(done, total)
    return digest.hexdigest()
