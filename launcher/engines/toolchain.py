"""The tools an engine build needs, found and asked: cmake and the C/C++ compilers ($CC/$CXX),
the mingw-w64 cross compilers for Windows, and for the cuda variant nvcc, its version, cuBLAS
and the GPU architectures to compile for. EngineError names what is missing and its package."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from launcher.errors import EngineError

MINGW = "x86_64-w64-mingw32"
# The GPUs of the plan's tiers: Ampere (A100 sm_80, RTX 30xx sm_86), Ada (RTX 40xx sm_89),
# Hopper (H100/H200 sm_90). Real code for each, no PTX: a build for other GPUs names them.
CUDA_ARCHITECTURES = ("80", "86", "89", "90")
_CUDA_ARCH = re.compile(r"^\d{2,3}[af]?(-real|-virtual)?$")
_NVCC_RELEASE = re.compile(r"release [\d.]+, V([\d.]+)")

# (tool, what it is, Debian package)
_TOOLS = (
    ("cmake", "cmake", "cmake"),
    ("cc", "C compiler", "gcc"),
    ("c++", "C++ compiler", "g++"),
)


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
