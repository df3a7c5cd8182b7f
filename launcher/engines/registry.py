"""Finding llama-server: the configured path, engines built into the cache (a directory counts
only with a valid manifest.json) and engines installed from wheels (launcher/engines/installed.py),
then PATH; and the manifest format the builder writes.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from launcher import paths
from launcher.digest import file_sha256
from launcher.errors import EngineError

log = logging.getLogger(__name__)

SERVER = "llama-server"
KIND = "llama-server"
VARIANTS = ("native", "portable", "cuda")
MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
VERSION_TIMEOUT = 15.0
CONFIG_KEY = "engines.llama_server.path"

Origin = Literal["config", "cache", "wheel", "PATH"]
# `version: 0.5.0-dev (build 1, commit 0c1e570)` now; `version: 1 (0c1e570)` in older builds.
_VERSION_LINE = re.compile(r"^version:\s*(.+?)\s*$", re.MULTILINE)
_VERSION_COMMIT = re.compile(r"\((?:.*\bcommit\s+)?([0-9a-f]{7,40})(?:-dirty)?\)")


def exe_name(name: str, platform_name: str | None = None) -> str:
    """`name` as an executable of `platform_name` (default: this machine's): `.exe` on Windows."""
    windows = platform_name.startswith("windows") if platform_name else os.name == "nt"
    return f"{name}.exe" if windows else name


def platform_tag() -> str:
    """`linux-x86_64`, `macos-arm64`, `windows-x86_64`: the OS and CPU an engine runs on."""
    system = platform.system().lower()
    system = {"darwin": "macos"}.get(system, system)
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64"}.get(machine, machine)
    return f"{system}-{machine}"


def engine_key(commit: str, variant: str, platform_name: str | None = None,
               patches_id: str = "") -> str:
    """`llama.cpp-<commit7>[-p<patch series>]-<variant>-<platform>`: the engine's directory
    name in the cache (the series: launcher.engines.patch_series)."""
    if variant not in VARIANTS:
        raise EngineError(f"unknown engine variant {variant!r}; use one of {', '.join(VARIANTS)}")
    series = f"-p{patches_id}" if patches_id else ""
    return f"llama.cpp-{commit[:7]}{series}-{variant}-{platform_name or platform_tag()}"


@dataclass(frozen=True)
class ManifestFile:
    """One installed file: a regular file with its digest, or a symlink (shared-library names)."""

    path: str  # relative to the engine directory, `/`-separated
    size: int = 0
    sha256: str = ""
    link: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.link is not None:
            return {"path": self.path, "link": self.link}
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class EngineManifest:
    """What `manifest.json` in an engine directory records; written last, read by the registry."""

    key: str
    commit: str
    commit_origin: str
    source: str
    variant: str
    platform: str
    cmake_flags: tuple[str, ...]
    compiler: str
    files: tuple[ManifestFile, ...]
    build_seconds: float
    lalo_version: str
    built_at: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": MANIFEST_SCHEMA,
            "kind": KIND,
            "key": self.key,
            "commit": self.commit,
            "commit_origin": self.commit_origin,
            "source": self.source,
            "variant": self.variant,
            "platform": self.platform,
            "cmake_flags": list(self.cmake_flags),
            "compiler": self.compiler,
            "files": [f.to_json() for f in self.files],
            "build_seconds": self.build_seconds,
            "lalo_version": self.lalo_version,
            "built_at": self.built_at,
            **dict(self.extra),
        }


def manifest_from_json(data: Any) -> EngineManifest:
    """Validate parsed manifest JSON; ValueError says what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("schema") != MANIFEST_SCHEMA or data.get("kind") != KIND:
        raise ValueError(f"unknown schema/kind {data.get('schema')!r}/{data.get('kind')!r}")

    def text(name: str) -> str:
        value = data.get(name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name}: missing or not a string")
        return value

    if data.get("variant") not in VARIANTS:
        raise ValueError(f"variant: {data.get('variant')!r} is not one of {VARIANTS}")
    flags = data.get("cmake_flags")
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise ValueError("cmake_flags: not a list of strings")
    seconds = data.get("build_seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ValueError("build_seconds: not a number")
    raw_files = data.get("files")
    if not isinstance(raw_files, list) or not raw_files:
        raise ValueError("files: missing or empty")
    files = tuple(_file_from_json(item) for item in raw_files)
    server = exe_name(SERVER, text("platform"))
    if not any(f.path == f"bin/{server}" and f.link is None for f in files):
        raise ValueError(f"files: no bin/{server}")
    known = {
        "schema", "kind", "key", "commit", "commit_origin", "source", "variant", "platform",
        "cmake_flags", "compiler", "files", "build_seconds", "lalo_version", "built_at",
    }
    return EngineManifest(
        key=text("key"), commit=text("commit"), commit_origin=text("commit_origin"),
        source=text("source"), variant=text("variant"), platform=text("platform"),
        cmake_flags=tuple(flags), compiler=text("compiler"), files=files,
        build_seconds=float(seconds), lalo_version=text("lalo_version"),
        built_at=text("built_at"), extra={k: v for k, v in data.items() if k not in known},
    )


def _file_from_json(item: Any) -> ManifestFile:
    if not isinstance(item, dict):
        raise ValueError("files: entry is not an object")
    rel = item.get("path")
    if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in rel.split("/"):
        raise ValueError(f"files: bad path {rel!r}")
    if "link" in item:
        link = item["link"]
        if not isinstance(link, str) or "/" in link:
            raise ValueError(f"files: {rel}: bad link {link!r}")
        return ManifestFile(path=rel, link=link)
    size, digest = item.get("size"), item.get("sha256")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"files: {rel}: bad size {size!r}")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"files: {rel}: bad sha256")
    return ManifestFile(path=rel, size=size, sha256=digest)


def read_manifest(engine_dir: Path) -> EngineManifest:
    """The engine directory's manifest, checked against the files present (sizes, not digests).

    EngineError when the directory is not a complete engine.
    """
    path = engine_dir / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        manifest = manifest_from_json(data)
    except FileNotFoundError as exc:
        raise EngineError(f"{engine_dir}: no {MANIFEST}; not a built engine") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EngineError(f"{path}: invalid engine manifest: {exc}") from exc
    for entry in manifest.files:
        target = engine_dir / entry.path
        if entry.link is not None:
            if not target.is_symlink() or os.readlink(target) != entry.link:
                raise EngineError(f"{engine_dir}: {entry.path} is not the recorded link")
        elif not target.is_file() or target.is_symlink() or target.stat().st_size != entry.size:
            raise EngineError(f"{engine_dir}: {entry.path} is missing or has the wrong size")
    return manifest


def verify_engine(engine_dir: Path) -> EngineManifest:
    """read_manifest plus every file's sha256; EngineError names the first file that differs."""
    manifest = read_manifest(engine_dir)
    for entry in manifest.files:
        if entry.link is None and file_sha256(engine_dir / entry.path) != entry.sha256:
            raise EngineError(f"{engine_dir}: {entry.path} does not match its sha256")
    return manifest


@dataclass(frozen=True)
class FoundEngine:
    """A llama-server binary and what is known of it (variant and manifest: cache engines only)."""

    kind: str
    path: Path
    origin: Origin
    version: str | None
    commit: str | None
    variant: str | None
    manifest: Path | None
    distribution: str | None = None  # an installed wheel's: "lalo-engine-portable 0.3.36"
    patches: tuple[str, ...] = ()  # lalo's llama.cpp patches it was built with (patch_series)

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def origin_text(self) -> str:
        """Where it came from, for people: "built here", "installed from wheel NAME VERSION"."""
        if self.origin == "wheel":
            return f"installed from wheel {self.distribution}"
        return {"config": "configured", "cache": "built here", "PATH": "on PATH"}[self.origin]


VersionProbe = Callable[[Path], "tuple[str, str | None] | None"]


def probe_version(
    binary: Path, timeout: float = VERSION_TIMEOUT
) -> tuple[str, str | None] | None:
    """(version text, short commit) from `llama-server --version`, which prints on stderr."""
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, errors="replace",
            timeout=timeout, check=False, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("%s --version failed: %s", binary, exc)
        return None
    return parse_version(done.stderr + "\n" + done.stdout)


def parse_version(output: str) -> tuple[str, str | None] | None:
    """(text after `version:`, short commit if it names one) from `--version` output."""
    match = _VERSION_LINE.search(output)
    if match is None:
        return None
    commit = _VERSION_COMMIT.search(match.group(1))
    return match.group(1), commit.group(1) if commit else None


def cached_engines(
    root: Path | None = None, *, platform_name: str | None = None
) -> Iterator[tuple[Path, EngineManifest]]:
    """Valid engines under the engines dir for this platform, newest first."""
    base = root if root is not None else paths.engines_dir()
    wanted = platform_name or platform_tag()
    found: list[tuple[Path, EngineManifest]] = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return iter(())
    for entry in entries:
        # Dot-names are staging and old directories of builds in progress.
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            manifest = read_manifest(entry)
        except EngineError as exc:
            log.debug("ignoring %s: %s", entry, exc)
            continue
        if manifest.platform == wanted and manifest.key == entry.name:
            found.append((entry, manifest))
    found.sort(key=lambda item: item[1].built_at, reverse=True)
    return iter(found)


def _from_cache(
    engine_dir: Path, manifest: EngineManifest, probe: VersionProbe,
    distribution: str | None = None,
) -> FoundEngine:
    """A cache engine, or with `distribution` the engine an installed wheel holds."""
    binary = engine_dir / "bin" / exe_name(SERVER)
    version = probe(binary)
    return FoundEngine(
        kind=KIND, path=binary, origin="cache" if distribution is None else "wheel",
        version=version[0] if version else None, commit=manifest.commit,
        variant=manifest.variant, manifest=engine_dir / MANIFEST, distribution=distribution,
        patches=tuple(manifest.extra.get("patches") or ()),
    )


Installed = Callable[[], "list[tuple[Path, EngineManifest, str]]"]
_told: set[str] = set()  # skipped wheel engines already logged by this process


def installed_wheels() -> list[tuple[Path, EngineManifest, str]]:
    """The engines of installed engine wheels as (directory, manifest, distribution); each one
    skipped is logged once (why it cannot run here)."""
    from launcher.engines.installed import installed_engines  # reads every dist's entry points

    found, skipped = installed_engines()
    for item in skipped:
        if item.distribution not in _told:
            _told.add(item.distribution)
            log.warning("engine of %s skipped: %s", item.distribution, item.reason)
    return [(engine.directory, engine.manifest, engine.distribution) for engine in found]


def _from_binary(binary: Path, origin: Origin, probe: VersionProbe) -> FoundEngine:
    version = probe(binary)
    built = _built_by_lalo(binary)
    return FoundEngine(
        kind=KIND, path=binary, origin=origin, version=version[0] if version else None,
        commit=version[1] if version else None, variant=None, manifest=None,
        patches=tuple(built.extra.get("patches") or ()) if built else (),
    )


def _built_by_lalo(binary: Path) -> EngineManifest | None:
    """The manifest of the engine directory a configured binary sits in (`DIR/bin/llama-server`
    of a lalo build, copied or not), so that its patches count; None for any other binary."""
    engine_dir = binary.parent.parent
    if binary.parent.name != "bin" or not (engine_dir / MANIFEST).is_file():
        return None
    try:
        return read_manifest(engine_dir)
    except EngineError:
        return None


def _configured_binary(configured: str) -> Path:
    path = Path(os.path.expandvars(configured)).expanduser()
    if path.is_dir():
        path = path / exe_name(SERVER)
    if not path.is_file():
        raise EngineError(f"{CONFIG_KEY}: {configured} does not exist")
    if not os.access(path, os.X_OK):
        raise EngineError(f"{CONFIG_KEY}: {configured} is not executable")
    return path


def find_llama_server(
    configured: str = "auto",
    variant: str = "native",
    *,
    engines_root: Path | None = None,
    which: Callable[[str], str | None] = shutil.which,
    probe: VersionProbe = probe_version,
    installed: Installed = installed_wheels,
) -> FoundEngine | None:
    """The llama-server to use: configured path > `variant` built here > `variant` from an
    installed wheel > any built here > any from a wheel > PATH. A built one is found without
    reading the installed distributions' entry points at all."""
    if configured != "auto":
        return _from_binary(_configured_binary(configured), "config", probe)
    cached = list(cached_engines(engines_root))
    for engine_dir, manifest in cached:
        if manifest.variant == variant:
            return _from_cache(engine_dir, manifest, probe)
    wheels = installed()
    for engine_dir, manifest, distribution in sorted(wheels, key=lambda w: w[1].variant != variant):
        if manifest.variant == variant or not cached:
            return _from_cache(engine_dir, manifest, probe, distribution)
    for engine_dir, manifest in cached:
        return _from_cache(engine_dir, manifest, probe)
    on_path = which(SERVER)
    if on_path is not None:
        return _from_binary(Path(on_path), "PATH", probe)
    return None


def require_llama_server(
    configured: str = "auto",
    variant: str = "native",
    *,
    engines_root: Path | None = None,
    which: Callable[[str], str | None] = shutil.which,
    probe: VersionProbe = probe_version,
    installed: Installed = installed_wheels,
) -> FoundEngine:
    """find_llama_server, or EngineError telling the user how to get one."""
    found = find_llama_server(
        configured, variant, engines_root=engines_root, which=which, probe=probe,
        installed=installed,
    )
    if found is None:
        raise EngineError("no llama-server found; run `lalo engine build`")
    return found


def find_tool(engine: FoundEngine, name: str) -> Path | None:
    """A llama.cpp tool (e.g. `llama-quantize`) built with the server, i.e. beside it."""
    candidate = engine.directory / exe_name(name)
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def list_engines(
    configured: str = "auto",
    *,
    engines_root: Path | None = None,
    which: Callable[[str], str | None] = shutil.which,
    probe: VersionProbe = probe_version,
    installed: Installed = installed_wheels,
) -> list[FoundEngine]:
    """Every llama-server found: configured, cache entries, installed wheels, PATH."""
    engines: list[FoundEngine] = []
    if configured != "auto":
        engines.append(_from_binary(_configured_binary(configured), "config", probe))
    engines.extend(_from_cache(d, m, probe) for d, m in cached_engines(engines_root))
    engines.extend(_from_cache(d, m, probe, dist) for d, m, dist in installed())
    on_path = which(SERVER)
    if on_path is not None:
        engines.append(_from_binary(Path(on_path), "PATH", probe))
    unique: list[FoundEngine] = []
    seen: set[Path] = set()
    for engine in engines:
        real = engine.path.resolve()
        if real not in seen:
            seen.add(real)
            unique.append(engine)
    return unique
