"""Engines installed as Python distributions (an engine wheel from `lalo engine build --wheel`,
installed with pip): found through the `lalo.engines` entry point group, whose entries name a
function that returns the engine directory (bin/llama-server and manifest.json, as in the cache).

One that cannot run here (another platform, a newer glibc than this system's, a binary that
lost its executable bit) is skipped with its reason: it never stops lalo from using another.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from launcher.engines.registry import MANIFEST, SERVER, EngineManifest, exe_name, platform_tag, read_manifest
from launcher.errors import EngineError

ENTRY_POINT_GROUP = "lalo.engines"

EntryPoints = Callable[[], Iterable[metadata.EntryPoint]]


@dataclass(frozen=True)
class InstalledEngine:
    directory: Path
    manifest: EngineManifest
    distribution: str  # "lalo-engine-portable 0.3.36"


@dataclass(frozen=True)
class SkippedEngine:
    distribution: str
    reason: str


def engine_entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def system_glibc() -> str | None:
    """This system's glibc version ("2.36"), None where the C library is another (musl)."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):  # not a glibc system, or not POSIX
        return None
    name, _, version = text.partition(" ")
    return version if name == "glibc" and version else None


def installed_engines(
    platform_name: str | None = None,
    *,
    entry_points: EntryPoints = engine_entry_points,
    glibc: Callable[[], str | None] = system_glibc,
) -> tuple[list[InstalledEngine], list[SkippedEngine]]:
    """The engines installed distributions offer for this platform (newest build first), and
    those skipped, each with why."""
    wanted = platform_name or platform_tag()
    found: list[InstalledEngine] = []
    skipped: list[SkippedEngine] = []
    for entry in entry_points():
        label = distribution_label(entry)
        try:
            directory, manifest = _engine_of(entry)
            reason = _cannot_run(directory, manifest, wanted, glibc())
        except EngineError as exc:
            reason = str(exc)
        if reason is not None:
            skipped.append(SkippedEngine(label, reason))
        else:
            found.append(InstalledEngine(directory, manifest, label))
    found.sort(key=lambda engine: engine.manifest.built_at, reverse=True)
    return found, skipped


def distribution_label(entry: metadata.EntryPoint) -> str:
    dist = entry.dist
    if dist is None:
        return f"entry point {entry.name}"
    return f"{dist.name} {dist.version}"


def _engine_of(entry: metadata.EntryPoint) -> tuple[Path, EngineManifest]:
    try:
        where = entry.load()()
    except Exception as exc:  # another distribution's code: whatever it raises, it is skipped
        raise EngineError(f"its entry point {entry.value} failed: {exc}") from exc
    if not isinstance(where, str | os.PathLike):
        raise EngineError(f"its entry point {entry.value} returned {where!r}, not a path")
    directory = Path(where)
    if directory.name == MANIFEST:
        directory = directory.parent
    return directory, read_manifest(directory)


def _cannot_run(directory: Path, manifest: EngineManifest, wanted: str,
                glibc: str | None) -> str | None:
    if manifest.platform != wanted:
        return f"built for {manifest.platform}, this system is {wanted}"
    needs = manifest.extra.get("glibc")
    if isinstance(needs, str) and glibc is not None and _version(needs) > _version(glibc):
        return f"needs glibc {needs} or later, this system has {glibc}"
    server = directory / "bin" / exe_name(SERVER, manifest.platform)
    if not os.access(server, os.X_OK):
        return f"{server} is not executable (installed without its file modes?)"
    return None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())
