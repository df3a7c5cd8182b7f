"""`lalo engine build`: configure and compile llama-server with cmake, install it atomically into
`engines_dir()/<key>/` with a manifest.json, reporting progress through a callback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, Protocol

from filelock import FileLock, Timeout

from launcher import __version__, paths
from launcher.digest import file_sha256
from launcher.engines import buildroot, patch_series
from launcher.engines import source as sources
from launcher.engines.buildroot import BuildRoot
from launcher.engines.registry import (
    MANIFEST,
    SERVER,
    EngineManifest,
    ManifestFile,
    cached_engines,
    engine_key,
    exe_name,
    platform_tag,
    read_manifest,
)
from launcher.errors import EngineError
from launcher.toolrun import run_lines

log = logging.getLogger(__name__)

Variant = Literal["native", "portable", "cuda"]
Stage = Literal["source", "configure", "build", "install"]

QUANTIZE = "llama-quantize"
TARGETS = (SERVER, QUANTIZE)
# Offline configure (FACTS.md): no curl, no web UI download, no tests or examples.
COMMON_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
VARIANT_FLAGS: dict[str, tuple[str, ...]] = {
    # Tuned to this CPU, one static binary.
    "native": ("-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"),
    # As llama.cpp's releases: one libggml-cpu-<variant>.so per x86/arm level, the best one
    # picked at run time; shared libs found beside the binary through rpath $ORIGIN.
    # No OpenSSL, so the binaries do not need this machine's libssl (lalo downloads models).
    "portable": (
        "-DGGML_NATIVE=OFF",
        "-DGGML_BACKEND_DL=ON",
        "-DGGML_CPU_ALL_VARIANTS=ON",
        "-DBUILD_SHARED_LIBS=ON",
        "-DCMAKE_INSTALL_RPATH=$ORIGIN",
        "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
        "-DLLAMA_OPENSSL=OFF",
    ),
}
# Windows from this machine: mingw-w64 cross-compiling one static llama-server.exe for a fixed
# x86-64 baseline (AVX2/FMA/F16C, Haswell and later), no OpenMP (ggml's own threads), no
# OpenSSL: it imports only Windows system DLLs (FACTS.md).
WINDOWS = "windows-x86_64"
MINGW = "x86_64-w64-mingw32"
WINDOWS_FLAGS = (
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
    "-DGGML_OPENMP=OFF",
)
TOOLCHAIN_FILE = "mingw-w64-x86_64.cmake"
# mingw-w64 10 lacks the THREAD_ power-throttling names ggml-cpu.c uses: map them to the
# PROCESS_ ones (same layout). The link is static so that no MinGW DLL need travel with it.
WINDOWS_TOOLCHAIN = f"""set(CMAKE_SYSTEM_NAME Windows)
set(CMAKE_SYSTEM_PROCESSOR x86_64)
set(CMAKE_C_COMPILER {MINGW}-gcc-posix)
set(CMAKE_CXX_COMPILER {MINGW}-g++-posix)
set(CMAKE_RC_COMPILER {MINGW}-windres)
set(CMAKE_FIND_ROOT_PATH /usr/{MINGW})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_C_FLAGS_INIT "-DTHREAD_POWER_THROTTLING_STATE=PROCESS_POWER_THROTTLING_STATE \
-DTHREAD_POWER_THROTTLING_CURRENT_VERSION=1 -DTHREAD_POWER_THROTTLING_EXECUTION_SPEED=1")
set(CMAKE_EXE_LINKER_FLAGS_INIT "-static -static-libgcc -static-libstdc++")
"""
# The portable Linux engine is compiled in a Debian 11 root (glibc 2.31, gcc 10) and carries
# the GCC runtime it links (OpenMP, C++), found beside it through rpath $ORIGIN: a client
# needs nothing but glibc >= the root's.
CARRIED_LIBRARIES = ("libgomp.so.1", "libstdc++.so.6", "libgcc_s.so.1")
_LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib64", "usr/lib")
ROOT_SOURCE = "/lalo/src"
ROOT_BUILD = "/lalo/build"
# CPU variants whose instructions (AVX-VNNI, AMX) an older GCC cannot emit: left out of the
# root's copy of the source (llama-server depends on every variant defined, so they cannot be
# skipped at build time); a CPU that has them runs the next best variant (icelake, zen4).
_VARIANT_MIN_GCC = {"alderlake": 11, "sapphirerapids": 11}
_VARIANT_LIST = "ggml/src/CMakeLists.txt"
_LEFT_OUT = "# lalo: left out, gcc < 11: "
_GCC_MAJOR = re.compile(r"\)\s+(\d+)\.\d+")
# The GPUs of the plan's tiers: Ampere (A100 sm_80, RTX 30xx sm_86), Ada (RTX 40xx sm_89),
# Hopper (H100/H200 sm_90). Real code for each, no PTX: a build for other GPUs names them.
CUDA_ARCHITECTURES = ("80", "86", "89", "90")
_CUDA_ARCH = re.compile(r"^\d{2,3}[af]?(-real|-virtual)?$")
_NVCC_RELEASE = re.compile(r"release [\d.]+, V([\d.]+)")
_CPU_VARIANT_TARGET = re.compile(r"\b(ggml-cpu-[A-Za-z0-9_.]+)\b")
_MAKE_PERCENT = re.compile(r"^\[\s*(\d{1,3})%\]\s*(.*)")
_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]\s*(.*)")
# The first line like this is usually the cause; what follows it is its context.
_FIRST_ERROR = re.compile(r"\berror\b|CMake Error|undefined reference|\bfatal\b", re.IGNORECASE)
ERROR_TAIL_LINES = 15

# (tool, what it is, Debian package)
_TOOLS = (
    ("cmake", "cmake", "cmake"),
    ("cc", "C compiler", "gcc"),
    ("c++", "C++ compiler", "g++"),
)


@dataclass(frozen=True)
class BuildProgress:
    """One progress report: `percent` is set for compile steps, None for stage messages."""

    stage: Stage
    message: str
    percent: int | None = None


ProgressCallback = Callable[[BuildProgress], None]


@dataclass(frozen=True)
class BuiltEngine:
    key: str
    path: Path  # the engine directory
    server: Path
    manifest: EngineManifest
    already_built: bool
    log_path: Path | None


class CommandRunner(Protocol):
    """Runs argv in `cwd`, passing each output line (stdout and stderr merged) to `on_line`;
    returns the exit code. Must stop the command before re-raising if interrupted."""

    def __call__(
        self, argv: Sequence[str], *, cwd: Path, on_line: Callable[[str], None]
    ) -> int: ...


def run_command(argv: Sequence[str], *, cwd: Path, on_line: Callable[[str], None]) -> int:
    """The real CommandRunner (toolrun.run_lines): Ctrl+C stops the whole build."""
    try:
        return run_lines(argv, cwd=cwd, on_line=on_line)
    except OSError as exc:
        raise EngineError(f"cannot run {argv[0]}: {exc}") from exc


def parse_progress(line: str) -> tuple[int, str] | None:
    """(percent, rest of line) from cmake's Makefile `[ 42%] ...` or Ninja's `[12/345] ...`."""
    match = _MAKE_PERCENT.match(line)
    if match:
        return min(int(match.group(1)), 100), match.group(2)
    match = _NINJA_STEP.match(line)
    if match and int(match.group(2)) > 0:
        return min(100 * int(match.group(1)) // int(match.group(2)), 100), match.group(3)
    return None


def relevant_tail(lines: Sequence[str], count: int = ERROR_TAIL_LINES) -> list[str]:
    """Up to `count` output lines from the first error on, or the last `count` if none looks
    like one; progress lines are left out (with -j N they interleave with the error)."""
    kept = [line for line in lines if line.strip() and parse_progress(line) is None]
    for index, line in enumerate(kept):
        if _FIRST_ERROR.search(line):
            return kept[index : index + count]
    return kept[-count:]


def check_tools(which: Callable[[str], str | None] = shutil.which) -> dict[str, str]:
    """Paths of cmake and the C/C++ compilers ($CC/$CXX honoured); EngineError names what is
    missing and the Debian package that provides it."""
    found: dict[str, str] = {}
    for tool, what, package in _TOOLS:
        override = {"cc": os.environ.get("CC"), "c++": os.environ.get("CXX")}.get(tool)
        names = [override] if override else [tool, {"cc": "gcc", "c++": "g++"}.get(tool, tool)]
        path = next((p for p in (which(n) for n in names) if p), None)
        if path is None:
            hint = f"`apt-get install {package}`"
            if package != "cmake":
                hint += " (or build-essential)"
            named = what if what == names[0] else f"{what} `{names[0]}`"
            raise EngineError(f"{named} not found; install it, e.g. {hint}")
        found[tool] = path
    return found


def compiler_version_text(compiler: str | Sequence[str]) -> str:
    argv = [compiler] if isinstance(compiler, str) else list(compiler)
    try:
        done = subprocess.run(
            [*argv, "--version"], capture_output=True, text=True, errors="replace",
            timeout=30, check=False, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout or done.stderr


def compiler_version(compiler: str | Sequence[str]) -> str:
    first = compiler_version_text(compiler).strip().splitlines()
    return first[0] if first else " ".join([compiler] if isinstance(compiler, str) else compiler)


def gcc_major(version: str) -> int | None:
    """12 from `gcc (Debian 12.2.0-14) 12.2.0`; None for another compiler or format."""
    match = _GCC_MAJOR.search(version) if "gcc" in version.lower() else None
    return int(match.group(1)) if match else None


def unbuildable_variants(compiler: str) -> list[str]:
    """The CPU variants (`alderlake`) that `compiler` (its --version line) cannot build."""
    major = gcc_major(compiler)
    return sorted(name for name, least in _VARIANT_MIN_GCC.items()
                  if major is not None and major < least)


def leave_out_variants(cmake_lists: str, names: Sequence[str]) -> str:
    """ggml's variant list with the `ggml_add_cpu_backend_variant(NAME ...)` lines for `names`
    commented out (idempotent)."""
    if not names:
        return cmake_lists
    pattern = re.compile(r"^(\s*)(ggml_add_cpu_backend_variant\((?:"
                         + "|".join(re.escape(n) for n in names) + r")\s.*)$", re.MULTILINE)
    return pattern.sub(lambda m: f"{m.group(1)}{_LEFT_OUT}{m.group(2)}", cmake_lists)


def cuda_architectures(requested: Sequence[str] | None) -> tuple[str, ...]:
    """The CUDA architectures to compile for: `requested` (e.g. ["89"], "8.9" also accepted),
    else the plan's tiers. Each must look like cmake's CMAKE_CUDA_ARCHITECTURES entries."""
    if not requested:
        return CUDA_ARCHITECTURES
    archs: list[str] = []
    for item in requested:
        for part in str(item).split(","):
            arch = part.strip().replace(".", "").removeprefix("sm_")
            if not _CUDA_ARCH.match(arch):
                raise EngineError(f"--cuda-arch: {part.strip()!r} is not a CUDA architecture "
                                  "(e.g. 89 for RTX 40xx, 80 for A100, 90 for H100)")
            if arch not in archs:
                archs.append(arch)
    return tuple(archs)


def find_nvcc(which: Callable[[str], str | None] = shutil.which) -> str:
    """The CUDA compiler ($CUDACXX, else nvcc on PATH); EngineError in one line without it."""
    override = os.environ.get("CUDACXX")
    path = override if override and Path(override).is_file() else which("nvcc")
    if path is None:
        raise EngineError("the cuda variant needs the CUDA toolkit: nvcc not found on PATH "
                          "(install CUDA 12 or 13, or set CUDACXX to its nvcc)")
    return path


def check_cuda_libraries(nvcc: str, extra_roots: Sequence[Path] | None = None) -> None:
    """llama.cpp's CUDA backend links cuBLAS: a toolkit with nvcc but no cuBLAS headers (as on
    a runtime-only or minimal CUDA install) fails at cmake's generate step, so say it first.
    Looked for beside nvcc, in $CUDA_PATH / $CUDA_HOME, /usr/local/cuda and /usr."""
    if extra_roots is None:
        extra_roots = [Path(v) for v in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME")) if v]
        extra_roots += [Path("/usr/local/cuda"), Path("/usr")]
    roots = [Path(nvcc).resolve().parent.parent, *extra_roots]
    candidates = [folder for root in roots
                  for folder in (root / "include", *sorted(root.glob("targets/*/include")))]
    if not any((folder / "cublas_v2.h").is_file() for folder in candidates):
        raise EngineError(f"the cuda variant needs cuBLAS, which the CUDA toolkit of {nvcc} lacks "
                          "(no cublas_v2.h): install its libcublas-dev package (e.g. "
                          "libcublas-dev-13-0 from NVIDIA's apt repository)")


def nvcc_version(nvcc: str) -> str:
    """"13.0.88" from `nvcc --version`, or its last line when the format is unknown."""
    text = compiler_version_text(nvcc)
    match = _NVCC_RELEASE.search(text)
    return match.group(1) if match else (text.strip().splitlines() or [nvcc])[-1]


def target_platform(name: str | None) -> str:
    """The platform tag to build for: this machine's (None, "host") or "windows"."""
    if name in (None, "", "host") or name == platform_tag():
        return platform_tag()
    if name in ("windows", WINDOWS):
        return WINDOWS
    raise EngineError(f"--platform: {name!r} is not one lalo builds for; use host or windows")


def cmake_flags(variant: str, cuda_archs: Sequence[str] | None = None,
                platform_name: str | None = None) -> tuple[str, ...]:
    if platform_name == WINDOWS and platform_tag() != WINDOWS:
        if variant != "portable":
            raise EngineError("--platform windows builds the portable variant only "
                              "(one static llama-server.exe for x86-64 with AVX2)")
        return (*COMMON_FLAGS, *WINDOWS_FLAGS)
    if variant == "cuda":
        # The CPU part tuned to this CPU (partly offloaded models run layers there), CUDA for
        # the named architectures: without the list, cmake would ask for `native`, which
        # needs a GPU at build time.
        return (*COMMON_FLAGS, *VARIANT_FLAGS["native"], "-DGGML_CUDA=ON",
                f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(cuda_architectures(cuda_archs))}")
    if variant not in VARIANT_FLAGS:
        raise EngineError(f"unknown engine variant {variant!r}; use native, portable or cuda")
    flags = (*COMMON_FLAGS, *VARIANT_FLAGS[variant])
    if sys.platform == "darwin":  # macOS spells "the binary's own directory" differently
        flags = tuple(f.replace("$ORIGIN", "@loader_path") for f in flags)
    return flags


def _shared_library(name: str) -> bool:
    return name.endswith((".dll", ".dylib")) or ".so" in name.split("/")[-1]


class EngineBuilder:
    """Builds one engine; every outside dependency is a constructor parameter for tests."""

    def __init__(
        self,
        *,
        engines_root: Path | None = None,
        cache_root: Path | None = None,
        runner: CommandRunner = run_command,
        which: Callable[[str], str | None] = shutil.which,
        fetch_pinned: Callable[[Callable[[str], None]], sources.LlamaCppSource] | None = None,
        clock: Callable[[], float] = time.monotonic,
        compiler_probe: Callable[[str | Sequence[str]], str] = compiler_version,
        nvcc_probe: Callable[[str], str] = nvcc_version,
        cuda_check: Callable[[str], None] = check_cuda_libraries,
        build_root: Callable[[Callable[[str], None]], BuildRoot] | None = None,
        use_build_root: bool | None = None,
        cublas_download: Callable[[str, Path], Path] | None = None,
        patches: Sequence[patch_series.Patch] | None = None,
    ) -> None:
        """`build_root` makes (or finds) the old-glibc root the portable Linux engine is built
        in; `use_build_root` False builds it on this machine instead (default: on Linux).
        `patches`: the series applied to the pinned source (default: lalo's own)."""
        self.patches = list(patches) if patches is not None else patch_series.series()
        self.engines_root = engines_root if engines_root is not None else paths.engines_dir()
        self.cache_root = cache_root if cache_root is not None else paths.cache_dir()
        self.runner = runner
        self.which = which
        self.fetch_pinned = fetch_pinned or self._fetch_pinned
        self.clock = clock
        self.compiler_probe = compiler_probe
        self.nvcc_probe = nvcc_probe
        self.cuda_check = cuda_check
        self.build_root = build_root or self._default_root
        self.use_build_root = (sys.platform.startswith("linux") if use_build_root is None
                               else use_build_root)
        self.cublas_download = cublas_download  # None: pip (cuda_deps.pip_download)

    def _default_root(self, note: Callable[[str], None]) -> BuildRoot:
        return buildroot.ensure_root(self.cache_root, report=note)

    def _fetch_pinned(self, note: Callable[[str], None]) -> sources.LlamaCppSource:
        return sources.pinned_source(cache=self.cache_root / "sources", progress=note)

    def build(
        self,
        variant: str = "native",
        source: Path | None = None,
        jobs: int | None = None,
        progress: ProgressCallback | None = None,
        *,
        force: bool = False,
        cuda_archs: Sequence[str] | None = None,
        platform_name: str | None = None,
    ) -> BuiltEngine:
        """Build (or find already built) the engine for `variant` from `source` (None: pinned
        sdist). Blocks for minutes; interrupting it leaves no engine directory behind.
        `cuda_archs`: the cuda variant's GPU architectures (default CUDA_ARCHITECTURES).
        `platform_name`: "windows" cross-compiles llama-server.exe with mingw-w64."""
        if cuda_archs and variant != "cuda":
            raise EngineError("--cuda-arch is for --variant cuda")
        plat = target_platform(platform_name)
        flags = cmake_flags(variant, cuda_archs, plat)
        in_root = self.use_build_root and variant == "portable" and plat == platform_tag()
        nvcc = find_nvcc(self.which) if variant == "cuda" else None
        report = progress or (lambda event: None)
        if nvcc is not None:
            flags = (*flags, *self._cuda_flags(nvcc, report))
        if jobs is not None and jobs < 1:
            raise EngineError(f"--jobs must be >= 1, got {jobs}")

        # Decide "already built" before any slow step: for the pinned sdist from manifests,
        # so a second call needs neither the source nor cmake.
        tree: sources.LlamaCppSource | None = None
        root_label = f"debian-{buildroot.SUITE}" if in_root else None
        # lalo's patch series goes on the pinned source; a user's own tree is built as it is
        patches = self.patches if source is None else []
        patches_id = patch_series.series_id(patches)
        if source is not None:
            tree = sources.user_source(source)
            existing = None if force else self._existing(engine_key(tree.commit, variant, plat))
        else:
            existing = None if force else self._built_from(sources.SDIST_LABEL, variant, plat,
                                                           patches_id)
        if existing is not None and _same_build(existing, flags, root_label):
            return existing

        if plat == WINDOWS and platform_tag() != WINDOWS:
            tools = check_mingw(self.which)
        elif not in_root:
            tools = check_tools(self.which)
        else:
            tools = {}
        root = None
        if in_root:
            root = self.build_root(lambda text: report(BuildProgress("source", text)))
            tools = _root_tools(root)
        if tree is None:
            tree = self.fetch_pinned(lambda text: report(BuildProgress("source", text)))
        if patches:
            report(BuildProgress("source", f"applying lalo's {len(patches)} llama.cpp patch(es) "
                                           f"(series {patches_id})"))
            tree = dataclasses.replace(tree, tree=patch_series.patched_tree(
                tree.tree, tree.commit7, patches, self.cache_root / "sources"))
        key = engine_key(tree.commit, variant, plat, patches_id)
        self.engines_root.mkdir(parents=True, exist_ok=True)
        with self._lock(key):
            return self._build_locked(key, tree, variant, flags, tools, jobs, report, force, nvcc,
                                      plat=plat, root=root, patches=patches)

    def _cuda_flags(self, nvcc: str, report: ProgressCallback) -> tuple[str, ...]:
        """cuBLAS (the toolkit's, else NVIDIA's wheel from PyPI) and the driver library:
        launcher/engines/cuda_deps.py (kept out of this module on purpose)."""
        from launcher.engines.cuda_deps import cuda_dependency_flags, pip_download

        return cuda_dependency_flags(
            nvcc, check=self.cuda_check, cache_root=self.cache_root, version=self.nvcc_probe,
            note=lambda text: report(BuildProgress("source", text)),
            download=self.cublas_download or pip_download)

    def _built_from(self, label: str, variant: str, plat: str,
                    patches_id: str = "") -> BuiltEngine | None:
        for engine_dir, manifest in cached_engines(self.engines_root, platform_name=plat):
            if manifest.source == label and manifest.variant == variant and \
                    manifest.extra.get("patches_id", "") == patches_id:
                return self._existing(engine_dir.name)
        return None

    def _existing(self, key: str) -> BuiltEngine | None:
        engine_dir = self.engines_root / key
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
    def _lock(self, key: str) -> Iterator[None]:
        """One build per key at a time: they would share the build tree and the staging names."""
        lock = FileLock(self.engines_root / f".lock-{key}")
        try:
            lock.acquire(timeout=0)
        except Timeout as exc:
            raise EngineError(f"another `lalo engine build` of {key} is running") from exc
        try:
            yield
        finally:
            lock.release()

    def _build_locked(
        self,
        key: str,
        tree: sources.LlamaCppSource,
        variant: str,
        flags: tuple[str, ...],
        tools: dict[str, str],
        jobs: int | None,
        report: ProgressCallback,
        force: bool,
        nvcc: str | None = None,
        *,
        plat: str | None = None,
        root: BuildRoot | None = None,
        patches: Sequence[patch_series.Patch] = (),
    ) -> BuiltEngine:
        plat = plat or platform_tag()
        label = root.label if root is not None else None
        if not force:  # built by another process meanwhile, or from another source label
            existing = self._existing(key)
            if existing is not None and _same_build(existing, flags, label):
                return existing
        for stale in self.engines_root.glob(f".*-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build; we hold the lock

        runner = self.runner
        compiler = (self.compiler_probe(tools["cc"]) if root is None
                    else self.compiler_probe(root.chroot_argv([tools["cc"]])))
        left_out: list[str] = []
        if root is not None:
            # The build sees only the root: the source is copied in, the build tree lives there.
            source_dir = Path(f"{ROOT_SOURCE}/llama.cpp-{tree.commit}")
            left_out = unbuildable_variants(compiler)
            _copy_source_into(tree.tree, root.host_path(str(source_dir)), left_out, tree.commit)
            build_dir = Path(f"{ROOT_BUILD}/{key}")
            host_build = root.host_path(str(build_dir))
            runner = _in_root(self.runner, root)
        else:
            source_dir = tree.tree.resolve()  # as CMakeCache.txt records it
            build_dir = host_build = self.cache_root / "build" / key
        if force or _configured_elsewhere(host_build, source_dir):
            shutil.rmtree(host_build, ignore_errors=True)
        host_build.mkdir(parents=True, exist_ok=True)
        if plat == WINDOWS and platform_tag() != WINDOWS:
            toolchain = host_build / TOOLCHAIN_FILE
            toolchain.write_text(WINDOWS_TOOLCHAIN, encoding="utf-8")
            flags_run = (*flags, f"-DCMAKE_TOOLCHAIN_FILE={toolchain}")
        else:
            flags_run = flags
        log_path = self.cache_root / "logs" / f"engine-build-{key}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = self.clock()
        # Line-buffered so `tail -f` on the log follows a running build.
        with log_path.open("w", encoding="utf-8", buffering=1) as log_file:
            session = _BuildSession(runner, log_file, log_path, report)
            where = f" in {root.path}" if root is not None else ""
            log_file.write(f"# lalo {__version__}: building {key} from {tree.label}{where}\n")
            report(BuildProgress("configure", f"configuring {key}{where}"))
            session.run(
                "configure",
                configure_argv(tools["cmake"], source_dir, build_dir, flags_run, nvcc),
                cwd=host_build,
            )
            targets = [SERVER] if plat == WINDOWS else list(TARGETS)
            if variant == "portable" and plat != WINDOWS:
                if left_out:
                    log_file.write(f"# {compiler} cannot build the {', '.join(left_out)} CPU "
                                   "variants: left out\n")
                targets += self._cpu_variant_targets(session, tools["cmake"], build_dir,
                                                     host_build)
            parallel = jobs or os.cpu_count() or 1
            what = f"compiling {', '.join(targets)} with {parallel} jobs"
            report(BuildProgress("build", what, 0))
            session.run(
                "build",
                [tools["cmake"], "--build", str(build_dir), "--config", "Release",
                 "--parallel", str(parallel), "--target", *targets],
                cwd=host_build,
            )
        report(BuildProgress("install", f"installing into {self.engines_root / key}"))
        manifest_fields = {
            "commit": tree.commit,
            "commit_origin": tree.commit_origin,
            "source": tree.label,
            "compiler": compiler,
            "left_out": ",".join(left_out),
        }
        if nvcc is not None:
            manifest_fields["cuda"] = self.nvcc_probe(nvcc)
        manifest_fields["patches"] = ",".join(p.name for p in patches)
        manifest_fields["patches_id"] = patch_series.series_id(list(patches))
        engine_dir = self._install(
            key, variant, flags, host_build, manifest_fields, lambda: self.clock() - started,
            plat=plat, root=root,
        )
        manifest = read_manifest(engine_dir)
        return BuiltEngine(
            key=key, path=engine_dir, server=engine_dir / "bin" / exe_name(SERVER, plat),
            manifest=manifest, already_built=False, log_path=log_path,
        )

    def _cpu_variant_targets(
        self, session: _BuildSession, cmake: str, build_dir: Path, cwd: Path
    ) -> list[str]:
        """The `ggml-cpu-<level>` libraries the portable build loads at run time."""
        listing: list[str] = []
        session.run(
            "configure", [cmake, "--build", str(build_dir), "--target", "help"],
            cwd=cwd, collect=listing,
        )
        found = sorted({m.group(1) for line in listing for m in _CPU_VARIANT_TARGET.finditer(line)})
        if not found:
            raise EngineError(
                f"portable build: cmake defined no ggml-cpu-* variant targets; log: {session.path}"
            )
        return found

    def _install(
        self,
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
        staging = self.engines_root / f".staging-{key}-{os.getpid()}"
        destination = self.engines_root / key
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
                    files.append(_copy(_root_library(root, name), staging, f"bin/{name}"))
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
                old = self.engines_root / f".old-{key}-{os.getpid()}"
                destination.rename(old)
            staging.rename(destination)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return destination


class _BuildSession:
    """Runs the build's commands, teeing their output to the log and progress to the callback."""

    def __init__(
        self, runner: CommandRunner, log_file: IO[str], path: Path, report: ProgressCallback
    ) -> None:
        self.runner = runner
        self.log_file = log_file
        self.path = path
        self.report = report
        self.percent = 0

    def run(
        self, stage: Stage, argv: Sequence[str], *, cwd: Path, collect: list[str] | None = None
    ) -> None:
        recent: list[str] = []

        def on_line(line: str) -> None:
            self.log_file.write(line + "\n")
            recent.append(line)
            del recent[:-2000]  # only the first error and what follows it are shown
            if collect is not None:
                collect.append(line)
            parsed = parse_progress(line) if stage == "build" else None
            if parsed is not None:
                # Make prints per-target percentages: keep the bar from going backwards.
                self.percent = max(self.percent, parsed[0])
                self.report(BuildProgress(stage, parsed[1], self.percent))

        self.log_file.write("$ " + " ".join(argv) + "\n")
        self.log_file.flush()
        try:
            code = self.runner(argv, cwd=cwd, on_line=on_line)
        except BaseException:
            self.log_file.write("# interrupted\n")
            raise
        finally:
            self.log_file.flush()
        if code != 0:
            tail = "\n".join("  " + line for line in relevant_tail(recent))
            raise EngineError(
                f"llama.cpp {stage} failed (`{Path(argv[0]).name}` exit {code}); last lines:\n"
                f"{tail}\nfull log: {self.path}"
            )


def _same_build(existing: BuiltEngine, flags: Sequence[str], root_label: str | None) -> bool:
    """A built cuda engine counts only for the same architectures; a portable one only when
    made the same way (in the same kind of build root, or none); native: always."""
    manifest = existing.manifest
    if manifest.variant == "cuda":
        return tuple(manifest.cmake_flags) == tuple(flags)
    if manifest.variant == "portable":
        return manifest.extra.get("build_root") == root_label
    return True


def check_mingw(which: Callable[[str], str | None] = shutil.which) -> dict[str, str]:
    """cmake and the mingw-w64 cross compilers (POSIX threads) for --platform windows."""
    found: dict[str, str] = {}
    for tool, name, package in (("cmake", "cmake", "cmake"),
                                ("cc", f"{MINGW}-gcc-posix", "gcc-mingw-w64-x86-64-posix"),
                                ("c++", f"{MINGW}-g++-posix", "g++-mingw-w64-x86-64-posix")):
        path = which(name)
        if path is None:
            raise EngineError(f"{name} not found; --platform windows cross-compiles with "
                              f"mingw-w64: `apt-get install {package}`")
        found[tool] = path
    return found


def _root_tools(root: BuildRoot) -> dict[str, str]:
    """cmake and gcc as seen inside the root; EngineError when the root lacks them."""
    tools = {"cmake": "/usr/bin/cmake", "cc": "/usr/bin/gcc", "c++": "/usr/bin/g++"}
    for path in tools.values():
        if not root.host_path(path).exists():
            raise EngineError(f"build root {root.path} has no {path}; remove it to remake it")
    return tools


def _in_root(runner: CommandRunner, root: BuildRoot) -> CommandRunner:
    def run(argv: Sequence[str], *, cwd: Path, on_line: Callable[[str], None]) -> int:
        return runner(root.chroot_argv(argv), cwd=cwd, on_line=on_line)

    return run


def _copy_source_into(tree: Path, target: Path, left_out: Sequence[str], commit: str) -> None:
    """The llama.cpp tree copied into the root once per commit (complete, or not there), with
    the CPU variants the root's compiler cannot build left out of it, and the commit written
    into its build info (the root has no git, so `--version` would say "commit unknown")."""
    if not target.is_dir():
        staging = target.with_name(f".{target.name}-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(tree, staging, symlinks=True,
                            ignore=shutil.ignore_patterns(".git", "build"))
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    variants = target / _VARIANT_LIST
    if variants.is_file():
        text = variants.read_text(encoding="utf-8")
        changed = leave_out_variants(text, left_out)
        if changed != text:
            variants.write_text(changed, encoding="utf-8")
    sources.stamp_commit(target, commit)


def _root_library(root: BuildRoot, name: str) -> Path:
    """The real file behind `name` (a SONAME) in the root's library folders, links followed
    inside the root (an absolute link there points into the root, not at this machine)."""
    for folder in _LIBRARY_DIRS:
        inside = f"/{folder}/{name}"
        for _ in range(16):
            candidate = root.host_path(inside)
            if not candidate.is_symlink():
                break
            link = os.readlink(candidate)
            inside = os.path.normpath(link if link.startswith("/")
                                      else f"{os.path.dirname(inside)}/{link}")
        if candidate.is_file() and not candidate.is_symlink():
            return candidate
    raise EngineError(f"build root {root.path} has no {name} to carry with the engine")


def configure_argv(cmake: str, tree: Path, build_dir: Path, flags: Sequence[str],
                   nvcc: str | None = None) -> list[str]:
    """cmake's configure command line; with nvcc, the CUDA compiler named (not looked up)."""
    argv = [cmake, "-S", str(tree), "-B", str(build_dir), *flags]
    if nvcc is not None:
        argv.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    return argv


def _cuda_extra(fields: dict[str, str], flags: Sequence[str]) -> dict[str, object]:
    """The manifest's CUDA facts: the toolkit version and the architectures compiled for."""
    if "cuda" not in fields:
        return {}
    archs = next(f.partition("=")[2] for f in flags if f.startswith("-DCMAKE_CUDA_ARCHITECTURES="))
    return {"cuda": fields["cuda"], "cuda_architectures": archs.split(";")}


def _configured_elsewhere(build_dir: Path, tree: Path) -> bool:
    """True when the build tree was configured for another source directory (cmake refuses)."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return False
    for line in cache.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:"):
            home = line.partition("=")[2].strip()
            return Path(home).resolve() != tree.resolve()
    return True


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


def build_engine(
    variant: Variant | str = "native",
    source: Path | None = None,
    jobs: int | None = None,
    progress: ProgressCallback | None = None,
    *,
    force: bool = False,
    cuda_archs: Sequence[str] | None = None,
    platform_name: str | None = None,
) -> BuiltEngine:
    """Build llama-server into the user cache (see EngineBuilder.build)."""
    return EngineBuilder().build(variant, source, jobs, progress, force=force,
                                 cuda_archs=cuda_archs, platform_name=platform_name)
