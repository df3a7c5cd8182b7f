"""Where lalo keeps things: user cache (engines, models), state (running instance) and config.

Each can be moved with an environment variable, which tests and packagers use:
LALO_CACHE_DIR, LALO_STATE_DIR, LALO_CONFIG_DIR.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import platformdirs

APP = "lalo"


def cache_dir() -> Path:
    return Path(os.environ.get("LALO_CACHE_DIR") or platformdirs.user_cache_dir(APP))


def state_dir() -> Path:
    return Path(os.environ.get("LALO_STATE_DIR") or platformdirs.user_state_dir(APP))


def config_dir() -> Path:
    return Path(os.environ.get("LALO_CONFIG_DIR") or platformdirs.user_config_dir(APP))


def engines_dir() -> Path:
    return cache_dir() / "engines"


def synthetic_dir() -> Path:
    """Generated random-weight models (demo, benchmarks)."""
    return cache_dir() / "synthetic"


def write_private_json(path: Path, data: Any) -> None:
    """Atomically write JSON readable only by this user (it holds tokens)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
