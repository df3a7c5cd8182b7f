"""The engines `lalo up` runs its models with: one per kind the models use, a missing
llama-server built on the spot (its progress as announced lines)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.config import Config, LoadedConfig
from launcher.engines.base import Engine
from launcher.engines.llama_cpp_python import LlamaCppPythonEngine
from launcher.engines.llama_server import LlamaServerEngine
from launcher.engines.llamafile import LlamafileEngine
from launcher.engines.patch_series import series
from launcher.errors import EngineError
from launcher.placement.resolve import ResolvedModel
from launcher.serve.announce import Announce

if TYPE_CHECKING:  # imported at run time only when an engine is built
    from launcher.engines.cmake import CommandRunner
    from launcher.engines.progress import StatusOutput


def engines_for(
    loaded: LoadedConfig,
    models: Sequence[ResolvedModel],
    announce: Announce,
    build: Callable[[str, Announce], Path] | None = None,
) -> dict[str, Engine]:
    """One engine per kind the models use; a missing llama-server is built (with progress)."""
    from launcher.engines.registry import find_llama_server

    config = loaded.config.engines
    kinds = {model.config.engine_kind for model in models}
    engines: dict[str, Engine] = {}
    if "llama-server" in kinds:
        # no `--version` probe: `lalo up` needs only the path, and a broken binary fails its
        # model's start with the server's own words
        found = find_llama_server(config.llama_server.path, config.llama_server.variant,
                                  probe=lambda binary: None)
        if found is not None:
            engines["llama-server"] = LlamaServerEngine.with_patches(found.path, found.patches)
        else:
            announce("no llama-server found: building it from llama.cpp source "
                     "(once; about 8 minutes on 2 cores)")
            builder = build or _build_engine
            # built now, from lalo's patch series
            engines["llama-server"] = LlamaServerEngine.with_patches(
                builder(config.llama_server.variant, announce), [p.name for p in series()])
    if "llamafile" in kinds:
        runtime = config.llamafile.runtime
        engines["llamafile"] = LlamafileEngine(
            runtime=Path(runtime).expanduser().resolve() if runtime else None
        )
    if "llama-cpp-python" in kinds:
        python = sys.executable if config.llama_cpp_python.python == "auto" \
            else config.llama_cpp_python.python
        if python == sys.executable:
            import importlib.util

            if importlib.util.find_spec("llama_cpp") is None:
                raise EngineError(
                    "the llama-cpp-python engine is not installed; "
                    "pip install 'lalo-launcher[llama-cpp-python]'"
                )
        engines["llama-cpp-python"] = LlamaCppPythonEngine(python=python)
    return engines


def _build_engine(variant: str, announce: Announce) -> Path:
    return build_llama_server(variant, LinesOnly(announce))


def llama_server_missing(config: Config, kinds: Collection[str] | None = None) -> bool:
    """True when a model needs llama-server and none is found (`lalo up` then builds one);
    `kinds`: the engine kinds its models use (default: those of `config`'s models)."""
    from launcher.engines.registry import find_llama_server

    if kinds is None:
        kinds = {model.engine_kind for model in config.models.values()}
    if "llama-server" not in kinds:
        return False
    settings = config.engines.llama_server
    return find_llama_server(settings.path, settings.variant, probe=lambda binary: None) is None


def build_llama_server(variant: str, out: StatusOutput, runner: CommandRunner | None = None) -> Path:
    """Build llama-server (`lalo up` on a first run) with its progress on `out`, each line
    starting `engine:`; `runner` runs cmake (a CancellableRunner when other work overlaps)."""
    from launcher.engines.builder import EngineBuilder
    from launcher.engines.cmake import run_command
    from launcher.engines.progress import BuildProgressView, duration

    view = BuildProgressView(out, label="engine: ")
    started = time.monotonic()
    try:
        built = EngineBuilder(runner=runner or run_command).build(variant, progress=view)
    finally:
        view.close()
    if not built.already_built:  # another lalo may have built it meanwhile
        out.line(f"engine: built {built.key} in {duration(time.monotonic() - started)}")
    return built.server


class LinesOnly:
    """A StatusOutput of whole lines only (no status line): what an `announce` function gives."""

    interactive = False

    def __init__(self, say: Announce) -> None:
        self._say = say

    def line(self, text: str) -> None:
        self._say(text)

    def status(self, text: str) -> None:
        pass

    def clear_status(self) -> None:
        pass
