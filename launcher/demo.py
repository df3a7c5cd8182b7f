"""The built-in demo: a generated random-weight model, so lalo runs with no network and no download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher import paths

DEMO_MODEL = "demo"
DEMO_FILE = "demo-llama-6m-random-weights-f16.gguf"


def ensure_demo_model(directory: Path | None = None) -> Path:
    """The demo GGUF in the cache, written on first use (well under a second)."""
    path = (directory or paths.synthetic_dir()) / DEMO_FILE
    if not path.is_file():
        # imported here: the writer pulls in gguf-py and numpy, which a running lalo does not need
        from launcher.models.synthetic import SHAPES, write_synthetic_model

        write_synthetic_model(
            path, SHAPES["demo"], tensor_type="F16",
            name="lalo demo llama 6M (random weights)",
        )
    return path


def demo_config(directory: Path | None = None) -> dict[str, Any]:
    """The built-in default config: one demo model, everything else at its defaults."""
    return {
        "models": {
            DEMO_MODEL: {
                "file": str(ensure_demo_model(directory)),
                "ctx_size": 2048,
                "parallel": 2,
                "aliases": ["demo-random-weights"],
            }
        }
    }
