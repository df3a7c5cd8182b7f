"""llama.cpp's cmake build: the flags of each variant and target platform, the configure and
compile command lines, and the session that runs them with their output teed to the build log
and their progress (`[ 42%]`, `[12/345]`) and first error lines picked out."""

from __future__ import annotations

import re
import shutil
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, Protocol

from launcher.engines.registry import SERVER, platform_tag
from launcher.engines.toolchain import MINGW, cuda_architectures
from launcher.errors import EngineError
from launcher.toolrun import run_lines
from launcher.units import format_size

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
_CPU_VARIANT_TARGET = re.compile(r"\b(ggml-cpu-[A-Za-z0-9_.]+)\b")
_MAKE_PERCENT = re.compile(r"^\[\s*(\d{1,3})%\]\s*(.*)")
_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]\s*(.*)")
# The first line like this is usually the cause; what follows it is its context.
_FIRST_ERROR = re.compile(r"\berror\b|CMake Error|undefined reference|\bfatal\b", re.IGNORECASE)
ERROR_TAIL_LINES = 15


@dataclass(frozen=True)
class BuildProgress:
    """One progress report: `percent` is set for compile steps, None for stage messages."""

    stage: Stage
    message: str
    percent: int | None = None


ProgressCallback = Callable[[BuildProgress], None]


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


def configure_argv(cmake: str, tree: Path, build_dir: Path, flags: Sequence[str],
                   nvcc: str | None = None) -> list[str]:
    """cmake's configure command line; with nvcc, the CUDA compiler named (not looked up)."""
    argv = [cmake, "-S", str(tree), "-B", str(build_dir), *flags]
    if nvcc is not None:
        argv.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    return argv


def configured_elsewhere(build_dir: Path, tree: Path) -> bool:
    """True when the build tree was configured for another source directory (cmake refuses)."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return False
    for line in cache.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:"):
            home = line.partition("=")[2].strip()
            return Path(home).resolve() != tree.resolve()
    return True


class BuildSession:
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
            if any(marker in line for line in recent for marker in DISK_FULL):
                raise DiskFullError(
                    f"the disk filled up during the llama.cpp {stage} in {cwd} "
                    f"({format_size(shutil.disk_usage(cwd).free)} free there now); free some "
                    f"space and build again (needs about {format_size(BUILD_ROOM)}); "
                    f"log: {self.path}")
            tail = "\n".join("  " + line for line in relevant_tail(recent))
            raise EngineError(
                f"llama.cpp {stage} failed (`{Path(argv[0]).name}` exit {code}); last lines:\n"
                f"{tail}\nfull log: {self.path}"
            )


# What a compiler or cmake prints when the disk is full (gcc: "No space left on device").
DISK_FULL = ("No space left on device", "Disk quota exceeded")
# Room a build needs in the cache: measured here 101 MiB of build tree and 22 MiB installed
# for the native build, 96 MiB for the Windows one; the portable build's CPU variants and
# CUDA's kernels take more, so the check asks for this much before it starts.
BUILD_ROOM = 256 * 1024**2
BUILD_ROOM_BY_VARIANT = {"native": BUILD_ROOM, "portable": 768 * 1024**2, "cuda": 3 * 1024**3}


class DiskFullError(EngineError):
    """The disk of the build filled up (the partial build is removed)."""


def require_build_room(where: Path, variant: str, free: int | None = None) -> None:
    """EngineError before a build starts when `where` has less room than the variant needs."""
    needed = BUILD_ROOM_BY_VARIANT.get(variant, BUILD_ROOM)
    free = shutil.disk_usage(where).free if free is None else free
    if free < needed:
        raise DiskFullError(
            f"not enough room to build llama.cpp ({variant}) in {where}: it needs about "
            f"{format_size(needed)}, {format_size(free)} free there; free some space or set "
            "LALO_CACHE_DIR to a larger disk")


BUILDING = ".lalo-building"  # in a build tree while a build runs; left only by a kill


def drop_unfinished(build_dir: Path) -> int:
    """After a build that never ended (its marker is still there: kill -9, a power cut),
    remove every file it wrote, which may be short or empty with a new time that make would
    trust; they are made again. Returns how many were removed."""
    marker = build_dir / BUILDING
    try:
        since = marker.stat().st_mtime - 2.0  # coarse file times
    except OSError:
        return 0
    removed = 0
    for path in build_dir.rglob("*"):
        try:
            info = path.lstat()
        except OSError:
            continue
        if path != marker and stat.S_ISREG(info.st_mode) and info.st_mtime >= since:
            path.unlink(missing_ok=True)
            removed += 1
    marker.unlink(missing_ok=True)
    return removed


def cpu_variant_targets(session: BuildSession, cmake: str, build_dir: Path, cwd: Path) -> list[str]:
    """The `ggml-cpu-<level>` libraries the portable build loads at run time."""
    listing: list[str] = []
    session.run("configure", [cmake, "--build", str(build_dir), "--target", "help"],
                cwd=cwd, collect=listing)
    found = sorted({m.group(1) for line in listing for m in _CPU_VARIANT_TARGET.finditer(line)})
    if not found:
        raise EngineError(
            f"portable build: cmake defined no ggml-cpu-* variant targets; log: {session.path}"
        )
    return found
