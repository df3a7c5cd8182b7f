"""Where lalo keeps things: user cache (engines, models), state (running instance) and config.

Each can be moved with an environment variable, which tests and packagers use:
LALO_CACHE_DIR, LALO_STATE_DIR, LALO_CONFIG_DIR.
"""

from __future__ import annotations

import os
from pathlib import Path

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
