"""`lalo engine build --wheel`: a built engine as a wheel that an organisation publishes on its
own package index; `pip install lalo-engine-portable` then lets lalo find the engine (entry
point group `lalo.engines`, launcher/engines/installed.py) without compiling llama.cpp.

The platform tag is `manylinux_2_X_<arch>`, 2.X the newest GLIBC_ symbol version that the
binaries and libraries need (`objdump -T`), so pip installs it only where it can run.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

from launcher import __version__
from launcher.engines import buildroot
from launcher.engines.installed import ENTRY_POINT_GROUP
from launcher.engines.registry import MANIFEST, EngineManifest, ManifestFile, read_manifest
from launcher.engines.source import LLAMA_CPP_PYTHON_VERSION, SDIST_LABEL
from launcher.errors import EngineError
from launcher.models.licenses import Component
from launcher.packaging.formats.wheel import WheelMember, write_wheel
from launcher.packaging.notices.notice import (
    LICENSES,
    NOTICE,
    Packaged,
    engine_components,
    engine_source_tree,
    notice_text,
)

DIST_PREFIX = "lalo-engine-"
ENGINE_DIR = "engine"  # the engine directory inside the wheel's package
_ARCH = {"x86_64": "x86_64", "arm64": "aarch64"}  # platform_tag()'s CPU -> manylinux's
# GCC's runtime, carried beside the portable engine that is built in the Debian 11 root
_GCC_RUNTIME = re.compile(r"(^|/)(libgomp|libstdc\+\+|libgcc_s)\.so")
GlibcProbe = Callable[[Sequence[Path]], "str | None"]
LibraryProbe = Callable[[Sequence[Path]], "list[str]"]
# glibc's own libraries: the manylinux tag's glibc version covers them
_GLIBC_PART = re.compile(r"^(libc|libm|libdl|librt|libpthread|libresolv|libutil|ld-linux[\w.-]*)\.so")


@dataclass(frozen=True)
class EngineWheel:
    path: Path
    name: str  # the distribution: lalo-engine-portable
    version: str
    tag: str  # py3-none-manylinux_2_31_x86_64
    glibc: str
    size: int


def distribution_name(variant: str) -> str:
    return f"{DIST_PREFIX}{variant}"


def wheel_version(manifest: EngineManifest) -> str:
    """The pinned llama-cpp-python release whose llama.cpp it is (PEP 440: 0.3.36), with lalo's
    patch series, when one was applied, as a local version (0.3.36+p1a2b3c4d: another series is
    another engine); for a user's checkout, 0 with the commit as a local version (0+g0c1e570)."""
    if manifest.source != SDIST_LABEL:
        return f"0+g{manifest.commit[:7]}"
    patches = manifest.extra.get("patches_id")
    if isinstance(patches, str) and re.fullmatch(r"[0-9a-zA-Z]+", patches):
        return f"{LLAMA_CPP_PYTHON_VERSION}+p{patches[:8].lower()}"
    return LLAMA_CPP_PYTHON_VERSION


def manylinux_tag(platform_name: str, glibc: str) -> str:
    """`py3-none-manylinux_2_31_x86_64`: any Python (the wheel holds no Python extension)."""
    system, _, cpu = platform_name.partition("-")
    if system != "linux" or cpu not in _ARCH:
        raise EngineError(f"--wheel makes Linux engine wheels (x86_64, arm64), not {platform_name}")
    major, minor = [*glibc.split("."), "0"][:2]
    return f"py3-none-manylinux_{major}_{minor}_{_ARCH[cpu]}"


def wheel_members(manifest: EngineManifest) -> list[tuple[ManifestFile, str]]:
    """(entry of the wheel's manifest, engine file its bytes come from). Wheels hold no
    symbolic links: a shared library's versioned names (libggml.so.0 -> libggml.so.0.9.4; the
    binaries load the first) become copies of the file, and the unversioned link (libggml.so,
    only for linking programs against it) is left out."""
    by_path = {entry.path: entry for entry in manifest.files}

    def final(path: str) -> ManifestFile:
        for _ in range(16):  # a link chain, bounded against loops
            entry = by_path.get(path)
            if entry is None:
                break
            if entry.link is None:
                return entry
            path = posixpath.join(posixpath.dirname(path), entry.link)
        raise EngineError(f"{MANIFEST}: {path} is a link to nothing the engine holds")

    members: list[tuple[ManifestFile, str]] = []
    for entry in manifest.files:
        if entry.link is None:
            members.append((entry, entry.path))
        elif not entry.path.endswith(".so"):
            target = final(entry.path)
            members.append((replace(target, path=entry.path), target.path))
    return members


def system_libraries(files: Sequence[Path]) -> list[str]:
    """The shared libraries `files` load (`objdump -p`, NEEDED) that they do not carry and that
    are not glibc's: what a machine needs besides glibc (the native engine: libgomp, OpenSSL)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        return []
    needed: set[str] = set()
    for path in files:
        try:
            done = subprocess.run([objdump, "-p", str(path)], capture_output=True, text=True,
                                  errors="replace", timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        needed.update(words[1] for words in map(str.split, done.stdout.splitlines())
                      if len(words) == 2 and words[0] == "NEEDED")
    carried = {path.name for path in files}
    return sorted(name for name in needed if name not in carried and not _GLIBC_PART.match(name))


def write_engine_wheel(engine_dir: Path, out: Path, *,
                       glibc_of: GlibcProbe = buildroot.glibc_required,
                       libraries_of: LibraryProbe = system_libraries) -> EngineWheel:
    """Write the wheel of the engine in `engine_dir` into the folder `out`; EngineError when it
    is not a complete engine, not a Linux one, or objdump cannot tell the glibc it needs."""
    manifest = read_manifest(engine_dir)
    members = wheel_members(manifest)
    binaries = [engine_dir / source for _, source in members]
    glibc = glibc_of(binaries)
    if glibc is None:
        raise EngineError("cannot tell which glibc the engine needs: `objdump -T` named no "
                          "GLIBC_ version (install binutils)")
    tag = manylinux_tag(manifest.platform, glibc)
    name, version = distribution_name(manifest.variant), wheel_version(manifest)
    package = name.replace("-", "_")
    dist_info = f"{package}-{version}.dist-info"
    # the registry skips an engine that needs a newer glibc than the system has
    packaged = replace(manifest, files=tuple(entry for entry, _ in members), extra={
        **manifest.extra, "glibc": glibc, "system_libraries": libraries_of(binaries)})
    files = [
        WheelMember(f"{package}/__init__.py", _init_text(manifest).encode()),
        WheelMember(f"{package}/{ENGINE_DIR}/{MANIFEST}",
                    (json.dumps(packaged.to_json(), indent=2) + "\n").encode()),
    ]
    for entry, source in members:
        path = engine_dir / source
        files.append(WheelMember(f"{package}/{ENGINE_DIR}/{entry.path}", path,
                                 executable=os.access(path, os.X_OK)))
    files += [WheelMember(f"{dist_info}/{rel}", text.encode())
              for rel, text in _dist_info(packaged, name, version, tag, package).items()]
    target = out / f"{package}-{version}-{tag}.whl"
    out.mkdir(parents=True, exist_ok=True)
    write_wheel(target, files, dist_info)
    return EngineWheel(target, name, version, tag, glibc, target.stat().st_size)


def _init_text(manifest: EngineManifest) -> str:
    return f'''"""llama-server built by lalo: llama.cpp {manifest.commit[:7]}, {manifest.variant} variant, \
{manifest.platform}.
lalo finds it through the `{ENTRY_POINT_GROUP}` entry point (`lalo engine list`)."""

from pathlib import Path


def engine_dir() -> str:
    """The engine directory: bin/llama-server and {MANIFEST}."""
    return str(Path(__file__).resolve().parent / "{ENGINE_DIR}")
'''


def _dist_info(manifest: EngineManifest, name: str, version: str, tag: str,
               package: str) -> dict[str, str]:
    """METADATA, WHEEL, entry_points.txt and the licence files (write_wheel adds RECORD)."""
    licenses = license_files(manifest, f"{name} {version}")
    description = (
        f"llama.cpp's llama-server and llama-quantize, {manifest.variant} variant for "
        f"{manifest.platform}, built by lalo {__version__} from {manifest.source} (llama.cpp "
        f"commit {manifest.commit[:12]}).\n\nInstalled beside lalo (`pip install {name}`), it "
        "lets `lalo up` start without compiling llama.cpp; `lalo engine list` shows where each "
        "engine came from.\n")
    libraries = manifest.extra.get("system_libraries") or []
    description += (f"\nIt needs glibc {manifest.extra.get('glibc')} or later"
                    + (f" and these libraries from the system: {', '.join(libraries)}.\n"
                       if libraries else ", and no other library from the system.\n"))
    if manifest.variant == "native":
        description += ("\nThe native variant is tuned to the CPU it was built on: it may stop "
                        "with 'illegal instruction' on other CPUs.\n")
    meta = "\n".join([
        "Metadata-Version: 2.1",
        f"Name: {name}",
        f"Version: {version}",
        f"Summary: llama-server (llama.cpp {manifest.commit[:7]}, {manifest.variant}) built by "
        "lalo, found by lalo without compiling",
        "Home-page: https://github.com/ggml-org/llama.cpp",
        "License: MIT",
        "Classifier: License :: OSI Approved :: MIT License",
        "Classifier: Operating System :: POSIX :: Linux",
        *(f"License-File: {rel}" for rel in sorted(licenses)),
        "Description-Content-Type: text/plain",
        "",
        description,
    ])
    wheel = (f"Wheel-Version: 1.0\nGenerator: lalo {__version__}\nRoot-Is-Purelib: false\n"
             f"Tag: {tag}\n")
    entry_points = f"[{ENTRY_POINT_GROUP}]\n{manifest.key} = {package}:engine_dir\n"
    return {"METADATA": meta, "WHEEL": wheel, "entry_points.txt": entry_points,
            **{f"licenses/{rel}": text for rel, text in licenses.items()}}


def license_files(manifest: EngineManifest, product: str) -> dict[str, str]:
    """llama.cpp's LICENSE (MIT), a NOTICE naming everything the wheel carries with the texts
    under LICENSES/ (as lalo's bundles do), and lalo's own NOTICE as NOTICE.lalo."""
    parts, _ = engine_components(manifest, engine_source_tree(manifest))
    parts += _gcc_runtime(manifest)
    files = {f"{LICENSES}/{item.name}": item.text for part in parts for item in part.files}
    files[NOTICE] = notice_text(f"{product}: llama-server built by lalo", parts)
    files["LICENSE"] = files[f"{LICENSES}/llama.cpp/LICENSE"]
    lalo = lalo_notice()
    if lalo is not None:
        files[f"{NOTICE}.lalo"] = lalo
    return files


def _gcc_runtime(manifest: EngineManifest) -> list[Packaged]:
    """GCC's runtime libraries, when the engine carries them (the portable one from the root)."""
    carried = sorted(posixpath.basename(f.path) for f in manifest.files
                     if f.link is None and _GCC_RUNTIME.search(f.path))
    if not carried:
        return []
    return [Packaged(Component(
        f"GCC runtime libraries ({', '.join(carried)})",
        "GPL-3.0-or-later WITH GCC-exception-3.1", "Copyright the Free Software Foundation",
        "https://gcc.gnu.org", note=f"from the Debian build root ({manifest.extra.get('build_root')})",
        license_name="GPL 3.0 or later with the GCC Runtime Library Exception 3.1",
        license_url="https://www.gnu.org/licenses/gcc-exception-3.1.html"))]


def lalo_notice() -> str | None:
    """lalo's own NOTICE: from its installed metadata, else beside the checkout's package."""
    try:
        text = metadata.distribution("lalo-launcher").read_text("licenses/NOTICE")
    except metadata.PackageNotFoundError:
        text = None
    if text:
        return text
    checkout = Path(__file__).resolve().parents[3] / "NOTICE"
    return checkout.read_text(encoding="utf-8") if checkout.is_file() else None
