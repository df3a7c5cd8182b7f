"""`lalo build SPEC --target windows`, made on Linux for Windows clients:

- `DIR/NAME-windows/`: the package folder: `NAME.exe` (lalo's launcher, launcher.c),
  `bin/llama-server.exe` (mingw-w64), `models/`, `presets.ini` and `lalo-launch.ini` (lalo's
  plan: packaging/windows/presets.py), NOTICE and LICENSES/. It runs where it lies;
- `DIR/NAME.exe`: the same launcher with the folder's files packed after it: one file, unpacked
  once into the user's local app data;
- `DIR/NAME-setup.exe`: an NSIS installer of the folder (packaging/windows/installer.py).

The engine is llama.cpp's own router mode: every model on one port, loaded on demand, as many
at once as lalo's RAM table allows on the machine it runs on. No Python runs on Windows.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher import __version__
from launcher.digest import file_sha256
from launcher.engines.install import BuiltEngine
from launcher.errors import PackagingError
from launcher.models.gguf_file import read_gguf
from launcher.models.shape import ModelFacts
from launcher.packaging import layout
from launcher.packaging.files import copy_file
from launcher.packaging.formats.winpack import PackFile, write_packed_exe
from launcher.packaging.inputs import ModelInput
from launcher.packaging.notices.notice import NOTICE, Packaged, write_notice
from launcher.packaging.spec import BundleSpec
from launcher.packaging.windows import presets, tools
from launcher.packaging.windows.installer import NSIS_DATA_LIMIT, installer_script
from launcher.units import format_size

PLATFORM = "windows-x86_64"
FOLDER_SUFFIX = "-windows"
# Windows maps no executable file over 4 GiB (llamafile meets the same limit).
EXE_LIMIT = 4 * 1024**3 - 1
Report = Callable[[str], None]
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class WindowsResult:
    folder: Path
    exe: Path | None  # None when over EXE_LIMIT (see warnings)
    setup: Path | None  # None when over NSIS_DATA_LIMIT
    size: int  # the folder's files
    models: tuple[presets.PackedModel, ...]
    warnings: tuple[str, ...]


def build_windows(
    spec: BundleSpec,
    models: Sequence[ModelInput],
    out: Path,
    *,
    engine: BuiltEngine,
    components: Sequence[Packaged],
    cache: Path,
    report: Report,
    progress: Progress | None = None,
) -> WindowsResult:
    spec.require_fixed_contexts("windows", "the RAM table in lalo-launch.ini")
    if engine.manifest.platform != PLATFORM:
        raise PackagingError(f"the Windows target needs a {PLATFORM} engine, got "
                             f"{engine.manifest.platform} ({engine.key})")
    if not models:
        raise PackagingError(f"{spec.source}: the Windows target needs at least one model")
    launcher = tools.launcher_exe(cache)
    folder = out / f"{spec.name}{FOLDER_SUFFIX}"
    packed = _stage(spec, models, folder, engine, components, launcher, report)
    files = sorted(str(p.relative_to(folder).as_posix()) for p in folder.rglob("*") if p.is_file())
    size = sum((folder / f).stat().st_size for f in files)
    warnings: list[str] = []
    exe = _single_file(spec, folder, files, launcher, out, report, progress, warnings)
    setup = _installer(spec, folder, files, out, size, report, warnings)
    return WindowsResult(folder=folder, exe=exe, setup=setup, size=size, models=tuple(packed),
                         warnings=tuple(warnings))


def _stage(spec: BundleSpec, models: Sequence[ModelInput], folder: Path, engine: BuiltEngine,
           components: Sequence[Packaged], launcher: Path, report: Report) -> list[presets.PackedModel]:
    """The package folder, assembled beside and renamed into place whole."""
    staging = folder.with_name(f".{folder.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    report(f"windows: assembling {folder}")
    try:
        copy_file(engine.server, staging / presets.SERVER)
        copy_file(launcher, staging / f"{spec.name}.exe")
        names = layout.model_file_names(models)
        packed = []
        for model in models:
            path = model.require_path().resolve()
            file = f"{presets.MODELS}/{names[model.name]}"
            if not (staging / file).exists():
                copy_file(path, staging / file)
            packed.append(presets.PackedModel(
                name=model.name, config=model.config, file=file,
                memory=presets.model_memory(ModelFacts.from_gguf(read_gguf(path)), model.config),
                template=_template(spec, model, staging),
            ))
        (staging / presets.PRESETS).write_text(presets.presets_ini(spec, packed), encoding="utf-8",
                                               newline="\r\n")
        (staging / presets.LAUNCH).write_text(presets.launch_ini(spec, packed), encoding="utf-8",
                                              newline="\r\n")
        write_notice(staging, f"{spec.name} (lalo {__version__} Windows package: llama.cpp "
                              "llama-server in router mode)", components)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return packed


def _template(spec: BundleSpec, model: ModelInput, staging: Path) -> str | None:
    """A chat template file the model names, copied beside the models (relative path)."""
    template = model.config.chat_template
    if template is None or not template.endswith(".jinja"):
        return None
    source = spec.path(template)
    if not source.is_file():
        raise PackagingError(f"models.{model.name}.chat_template: {source} does not exist")
    relative = f"{presets.TEMPLATES}/{model.name}-{source.name}"
    copy_file(source, staging / relative)
    return relative


def _single_file(spec: BundleSpec, folder: Path, files: Sequence[str], launcher: Path, out: Path,
                 report: Report, progress: Progress | None, warnings: list[str]) -> Path | None:
    exe = out / f"{spec.name}.exe"
    inside = [f for f in files if f != f"{spec.name}.exe"]
    total = launcher.stat().st_size + sum((folder / f).stat().st_size for f in inside)
    if total > EXE_LIMIT:
        exe.unlink(missing_ok=True)
        warnings.append(
            f"windows: {exe.name} not built: it would be {format_size(total)} and Windows runs no "
            f"program over 4 GiB; ship {folder.name}/ (its {spec.name}.exe serves the models "
            "beside it) or the installer")
        return None
    report(f"windows: writing {exe.name} ({format_size(total)})")
    pack = [PackFile(path=f, source=folder / f, sha256=file_sha256(folder / f)) for f in inside]
    write_packed_exe(launcher, pack, exe,
                     progress=(lambda done, all_: progress(exe.name, done, all_)) if progress else None)
    return exe


def _installer(spec: BundleSpec, folder: Path, files: Sequence[str], out: Path, size: int,
               report: Report, warnings: list[str]) -> Path | None:
    setup = out / f"{spec.name}-setup.exe"
    if size > NSIS_DATA_LIMIT:
        setup.unlink(missing_ok=True)
        warnings.append(
            f"windows: {setup.name} not built: its {format_size(size)} of files exceed the 2 GB an "
            f"NSIS installer can hold; ship {folder.name}/ (zipped) or {spec.name}.exe")
        return None
    report(f"windows: writing {setup.name} with NSIS")
    script = out / f".{spec.name}-setup.nsi"
    partial = out / f".{setup.name}.{os.getpid()}.tmp"
    try:
        script.write_text(installer_script(spec.name, str(folder), files, str(partial),
                                           notice=NOTICE), encoding="utf-8")
        tools.makensis(script)
        os.replace(partial, setup)
    finally:
        script.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return setup
