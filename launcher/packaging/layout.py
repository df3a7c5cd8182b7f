"""What goes where in a bundle or the single binary: the engine files, the models' file names,
the generated `lalo.yaml`, and the start scripts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from launcher.config import parse_config
from launcher.engines.install import BuiltEngine
from launcher.engines.registry import SERVER, ManifestFile, exe_name
from launcher.errors import PackagingError
from launcher.packaging.frozen.entry import BUNDLE_DIR_ENV, ENGINE_DIR_ENV, MODELS_DIR_ENV
from launcher.packaging.inputs import ModelInput
from launcher.packaging.spec import BundleSpec

ENGINE_BIN = "bin"
START_SCRIPT = "start"
START_CMD = "start.cmd"

START_SH = """\
#!/bin/sh
# Start lalo on this bundle's models: `lalo up` on lalo.yaml, the dashboard and the
# OpenAI-compatible API on http://127.0.0.1:{port}/ (Ctrl+C stops everything).
# Arguments go to lalo itself:  ./start up --port 9000 | ./start status | ./start down
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd -P) || exit 1
exec "$here/lalo/lalo" "$@"
"""

START_BAT = """\
@echo off
rem Start lalo on this bundle's models (`lalo up` on lalo.yaml); arguments go to lalo.
"%~dp0lalo\\lalo.exe" %*
"""


def engine_files(engine: BuiltEngine) -> list[ManifestFile]:
    """The engine files a bundle ships: llama-server and the shared libraries beside it
    (the CPU variants of a portable build); not llama-quantize or its library."""
    server = f"{ENGINE_BIN}/{exe_name(SERVER)}"
    chosen = [
        f for f in engine.manifest.files
        if f.path == server
        or (f.path.startswith(f"{ENGINE_BIN}/") and _is_library(f.path) and "quantize" not in f.path)
    ]
    if not any(f.path == server for f in chosen):
        raise PackagingError(f"{engine.path}: the engine has no {server}")
    return sorted(chosen, key=lambda f: f.path)


def _is_library(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.endswith((".dll", ".dylib")) or ".so" in name


def model_file_names(models: Sequence[ModelInput]) -> dict[str, str]:
    """Model name -> file name in `models/`: the GGUF's own name; one copy per source file;
    `<model>-<name>` where two different files share a name."""
    by_source: dict[Path, str] = {}
    taken: set[str] = set()
    names: dict[str, str] = {}
    for model in models:
        source = model.require_path().resolve()
        if source in by_source:
            names[model.name] = by_source[source]
            continue
        name = model.file_name if model.file_name.endswith(".gguf") else f"{model.file_name}.gguf"
        if name in taken:
            name = f"{model.name}-{name}"
        taken.add(name)
        by_source[source] = names[model.name] = name
    return names


def bundled_config(
    spec: BundleSpec,
    models: Sequence[ModelInput],
    files: Mapping[str, str],
    *,
    engine_path: str,
    variant: str,
    header: str,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The `lalo.yaml` a bundle or binary runs: the spec's proxy, resources and supervisor
    sections (with `overrides` merged in), the engine, and each model with its settings and
    `file:` pointing at the packaged copy."""
    data: dict[str, Any] = {}
    for section in ("proxy", "resources", "supervisor"):
        values = getattr(spec.config, section).model_dump(mode="json", exclude_unset=True)
        values.update((overrides or {}).get(section, {}))
        if values:
            data[section] = values
    data["engines"] = {"llama_server": {"path": engine_path, "variant": variant}}
    data["models"] = {}
    for model in models:
        entry = model.config.model_dump(mode="json", exclude_unset=True)
        entry.pop("catalog", None)
        entry.pop("engine", None)  # always llama-server here
        entry["file"] = files[model.name]
        entry["license"] = model.license.id
        data["models"][model.name] = entry
    text = header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    parse_config(text, label="generated lalo.yaml", total_ram=1 << 62)  # must load as written
    return text


def bundle_engine_path() -> str:
    # $LALO_BUNDLE_DIR is set by the frozen lalo (from where it sits): paths in the config
    # then work from any working directory. A folder: llama-server(.exe) is found inside it.
    return f"${{{BUNDLE_DIR_ENV}}}/{ENGINE_BIN}"


def embedded_engine_path() -> str:
    return f"${{{ENGINE_DIR_ENV}}}"


def embedded_model_path(file_name: str) -> str:
    return f"${{{MODELS_DIR_ENV}}}/{file_name}"


def write_start_scripts(root: Path, port: int) -> list[Path]:
    """`start` (POSIX sh, 0755), and on Windows `start.cmd`."""
    script = root / START_SCRIPT
    script.write_text(START_SH.format(port=port), encoding="utf-8", newline="\n")
    script.chmod(0o755)
    written = [script]
    if os.name == "nt":
        cmd = root / START_CMD
        cmd.write_text(START_BAT, encoding="utf-8", newline="\r\n")
        written.append(cmd)
    return written
