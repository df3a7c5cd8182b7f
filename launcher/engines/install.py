"""Engines in the cache (`engines_dir()/<key>/`): found by key or by the source they were built
from, one build per key at a time (a file lock), and installed atomically: the outputs copied
into a staging folder, manifest.json written last, then renamed into place."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from launcher import __version__
from launcher.digest import file_sha256
from launcher.engines import buildroot
from launcher.engines.buildroot import BuildRoot
from launcher.engines.cmake import TARGETS, WINDOWS
from launcher.engines.registry import (
    MANIFEST,
    SERVER,
    EngineManifest,
    ManifestFile,
    cached_engines,
    exe_name,
    platform_tag,
    read_manifest,
)
from launcher.engines.root_build import CARRIED_LIBRARIES, root_library
from launcher.errors import EngineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltEngine:
    key: str
    path: Path  # the engine directory
    server: Path
    manifest: EngineManifest
    already_built: bool
    log_path: Path | None


def built_from(engines_root: Path, label: str, variant: str, plat: str,
               patches_id: str = "") -> BuiltEngine | None:
    """The engine built from `label` (the pinned sdist) for `variant` with the patch series
    `patches_id`, found by its manifest; None if there is none."""
    for engine_dir, manifest in cached_engines(engines_root, platform_name=plat):
        if manifest.source == label and manifest.variant == variant and \
                manifest.extra.get("patches_id", "") == patches_id:
            return existing_engine(engines_root, engine_dir.name)
    return None

def existing_engine(engines_root: Path, key: str) -> BuiltEngine | None:
    """The engine installed as `key`; None if not there or its manifest is unreadable."""
    engine_dir = engines_root / key
    if not engine_dir.is_dir():
        return None
    try:
        manifest = read_manifest(engine_dir)
    except EngineError as exc:
        log.warning("%s; it will be rebuilt", exc)
        return None
    return BuiltEngine(
        key=key, path=engine_dir,
        server=engine_dir / "bin" / exe_name(SERVER, manifest.platform),
        manifest=manifest, already_built=True, log_path=None,
    )

@contextlib.contextmanager
def build_lock(engines_root: Path, key: str) -> Iterator[None]:
    """One build per key at a time: they would share the build tree and the staging names."""
    lock = FileLock(engines_root / f".lock-{key}")
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise EngineError(f"another `lalo engine build` of {key} is running") from exc
    try:
        yield
    finally:
        lock.release()


def same_build(existing: BuiltEngine, flags: Sequence[str], root_label: str | None) -> bool:
    """A built cuda engine counts only for the same architectures; a portable one only when
    made the same way (in the same kind of build root, or none); native: always."""
    manifest = existing.manifest
    if manifest.variant == "cuda":
        return tuple(manifest.cmake_flags) == tuple(flags)
    if manifest.variant == "portable":
        return manifest.extra.get("build_root") == root_label
    return True


def install_engine(
    engines_root: Path,
    key: str,
    variant: str,
    flags: tuple[str, ...],
    build_dir: Path,
    fields: dict[str, str],
    elapsed: Callable[[], float],
    *,
    plat: str | None = None,
    root: BuildRoot | None = None,
) -> Path:
    """Copy the outputs into a staging directory beside the destination, write the manifest
    last, then rename into place, so the final name only ever holds a complete engine."""
    plat = plat or platform_tag()
    bin_dirs = [d for d in (build_dir / "bin", build_dir / "bin" / "Release") if d.is_dir()]
    staging = engines_root / f".staging-{key}-{os.getpid()}"
    destination = engines_root / key
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "bin").mkdir(parents=True)
        files: list[ManifestFile] = []
        for name in [SERVER] if plat == WINDOWS else TARGETS:
            exe = exe_name(name, plat)
            built = next((d / exe for d in bin_dirs if (d / exe).is_file()), None)
            if built is None:
                raise EngineError(f"build finished but produced no {exe} in "
                                  f"{build_dir / 'bin'}")
            files.append(_copy(built, staging, f"bin/{exe}"))
        if variant == "portable" and plat != WINDOWS:
            for lib_dir in bin_dirs:
                for lib in sorted(lib_dir.iterdir()):
                    if _shared_library(lib.name) and (lib.is_file() or lib.is_symlink()):
                        files.append(_copy(lib, staging, f"bin/{lib.name}"))
        extra = _cuda_extra(fields, flags)
        if fields.get("patches"):  # lalo's llama.cpp patch series (patch_series.py)
            extra = {**extra, "patches": fields["patches"].split(","),
                     "patches_id": fields["patches_id"]}
        if root is not None:
            for name in CARRIED_LIBRARIES:
                files.append(_copy(root_library(root, name), staging, f"bin/{name}"))
            binaries = [staging / f.path for f in files if f.link is None]
            extra = {**extra, "build_root": root.label,
                     "glibc": buildroot.glibc_required(binaries) or "unknown",
                     "cpu_variants_left_out": [n for n in fields["left_out"].split(",") if n]}
        manifest = EngineManifest(
            key=key, commit=fields["commit"], commit_origin=fields["commit_origin"],
            source=fields["source"], variant=variant, platform=plat,
            cmake_flags=flags, compiler=fields["compiler"], files=tuple(files),
            build_seconds=round(elapsed(), 1), lalo_version=__version__,
            built_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            extra=extra,
        )
        _write_json(staging / MANIFEST, manifest)
        old = None
        if destination.exists():
            old = engines_root / f".old-{key}-{os.getpid()}"
            destination.rename(old)
        staging.rename(destination)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def _shared_library(name: str) -> bool:
    return name.endswith((".dll", ".dylib")) or ".so" in name.split("/")[-1]


def _cuda_extra(fields: dict[str, str], flags: Sequence[str]) -> dict[str, object]:
    """The manifest's CUDA facts: the toolkit version and the architectures compiled for."""
    if "cuda" not in fields:
        return {}
    archs = next(f.partition("=")[2] for f in flags if f.startswith("-DCMAKE_CUDA_ARCHITECTURES="))
    return {"cuda": fields["cuda"], "cuda_architectures": archs.split(";")}


def _copy(source_path: Path, staging: Path, rel: str) -> ManifestFile:
    target = staging / rel
    if source_path.is_symlink():
        # Shared libraries come as libggml.so -> libggml.so.0 -> libggml.so.0.9.4; the binaries
        # ask for the SONAME, so keep the chain rather than three copies.
        link = os.readlink(source_path)
        if "/" in link:
            raise EngineError(f"{source_path}: links outside its directory ({link})")
        target.symlink_to(link)
        return ManifestFile(path=rel, link=link)
    shutil.copy2(source_path, target)
    return ManifestFile(path=rel, size=target.stat().st_size, sha256=file_sha256(target))


def _write_json(path: Path, manifest: EngineManifest) -> None:
    with path.open("w", encoding="utf-8") as handle:
        json.dump(manifest.to_json(), handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
