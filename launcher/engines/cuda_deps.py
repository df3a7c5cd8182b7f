"""What the cuda variant links besides nvcc's own runtime: cuBLAS and the driver library.

cuBLAS: the toolkit's when it has `cublas_v2.h`, else NVIDIA's wheel from PyPI (`nvidia-cublas`
for CUDA 13, `nvidia-cublas-cu12` for 12; headers and `libcublas.so.N` / `libcublasLt.so.N`),
fetched once with this Python's pip into the user cache, matched to nvcc's major.minor, and
named to cmake (`CUDA_cublas_LIBRARY`, `CUDA_cublasLt_LIBRARY`, the include folder). The
driver: without `libcuda.so` (a build box with no NVIDIA driver and no toolkit stubs) llama.cpp's
CUDA VMM pool cannot be linked, so it is turned off (`GGML_CUDA_NO_VMM=ON`, the legacy pool).
cuBLAS is NVIDIA proprietary software under the CUDA EULA: see docs/gpu.md.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from launcher.errors import EngineError

# the PyPI project holding cuBLAS for each CUDA major version
CUBLAS_WHEELS = {"12": "nvidia-cublas-cu12", "13": "nvidia-cublas"}
_VERSION = re.compile(r"^(\d+)\.(\d+)")
_LIBRARY = re.compile(r"^(libcublas|libcublasLt)\.so\.\d+$")
MARKER = "wheel.txt"  # written last: a folder without it is an interrupted extraction
PIP_TIMEOUT = 3600.0

Note = Callable[[str], None]
Download = Callable[[str, Path], Path]


@dataclass(frozen=True)
class CublasFiles:
    include: Path  # holds cublas_v2.h
    cublas: Path  # libcublas.so (a link to libcublas.so.N)
    cublas_lt: Path
    wheel: str  # the wheel's file name


def wheel_requirement(cuda_version: str) -> str:
    """"nvidia-cublas>=13.0,<13.1" for nvcc 13.0.88: cuBLAS of the toolkit's major.minor."""
    match = _VERSION.match(cuda_version)
    if match is None:
        raise EngineError(f"cannot tell the CUDA version from nvcc's {cuda_version!r}")
    major, minor = match.group(1), int(match.group(2))
    project = CUBLAS_WHEELS.get(major)
    if project is None:
        raise EngineError(f"no cuBLAS wheel known for CUDA {major} (lalo knows CUDA "
                          f"{', '.join(sorted(CUBLAS_WHEELS))})")
    return f"{project}>={major}.{minor},<{major}.{minor + 1}"


def pip_download(requirement: str, dest: Path) -> Path:
    """One binary wheel for this machine, without its dependencies, through this Python's pip."""
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--dest", str(dest), requirement]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=PIP_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"pip download {requirement} failed: {exc}") from None
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise EngineError(f"pip download {requirement} failed: "
                          f"{lines[-1] if lines else f'exit {done.returncode}'}")
    return wheels[0]


def extract_cublas(wheel: Path, folder: Path) -> CublasFiles:
    """The headers and the two libraries of the wheel into `folder` (include/, lib/), with the
    unversioned `.so` links the linker looks for."""
    (folder / "include").mkdir(parents=True, exist_ok=True)
    (folder / "lib").mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                path = PurePosixPath(member.filename)
                if path.parent.name == "include" and path.suffix == ".h":
                    target = folder / "include" / path.name
                elif _LIBRARY.match(path.name) and path.parent.name == "lib":
                    target = folder / "lib" / path.name
                else:
                    continue
                with archive.open(member) as source, target.open("wb") as out:
                    shutil.copyfileobj(source, out, 1024 * 1024)
    except (OSError, zipfile.BadZipFile) as exc:
        raise EngineError(f"{wheel.name}: cannot extract cuBLAS: {exc}") from None
    if not (folder / "include" / "cublas_v2.h").is_file():
        raise EngineError(f"{wheel.name} has no cublas_v2.h: not a cuBLAS wheel lalo can use")
    for stem in ("libcublas", "libcublasLt"):
        versioned = sorted((folder / "lib").glob(f"{stem}.so.*"))
        if not versioned:
            raise EngineError(f"{wheel.name} has no {stem}.so.N")
        link = folder / "lib" / f"{stem}.so"
        link.unlink(missing_ok=True)
        link.symlink_to(versioned[0].name)
    (folder / MARKER).write_text(wheel.name + "\n", encoding="utf-8")
    return _files(folder)


def _files(folder: Path) -> CublasFiles:
    wheel = (folder / MARKER).read_text(encoding="utf-8").strip()
    return CublasFiles(folder / "include", folder / "lib" / "libcublas.so",
                       folder / "lib" / "libcublasLt.so", wheel)


def fetch_cublas(cuda_version: str, cache_root: Path, note: Note,
                 download: Download = pip_download) -> CublasFiles:
    """cuBLAS for nvcc's major.minor from PyPI, extracted once under `cache_root`/cuda/."""
    requirement = wheel_requirement(cuda_version)
    major_minor = ".".join(cuda_version.split(".")[:2])
    folder = cache_root / "cuda" / f"cublas-{major_minor}"
    if (folder / MARKER).is_file():
        files = _files(folder)
        note(f"cuBLAS from {files.wheel} (cached in {folder})")
        return files
    note(f"the CUDA toolkit has no cuBLAS: fetching {requirement} from PyPI with pip "
         "(a wheel of about 420 MB, once)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".download-") as tmp:
            wheel = download(requirement, Path(tmp))
            extract_cublas(wheel, staging)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = _files(folder)
    note(f"cuBLAS from {files.wheel} in {folder}")
    return files


def cublas_cmake_flags(files: CublasFiles) -> tuple[str, ...]:
    """cmake's FindCUDAToolkit takes the libraries as given; the headers go to every CUDA and
    C++ compile (its CUDA::cublas target only names the toolkit's include folder). The
    libraries' folder lands in the binary's RUNPATH, so llama-server finds them at run time."""
    return (f"-DCUDA_cublas_LIBRARY={files.cublas}",
            f"-DCUDA_cublasLt_LIBRARY={files.cublas_lt}",
            f"-DCMAKE_CUDA_STANDARD_INCLUDE_DIRECTORIES={files.include}",
            f"-DCMAKE_CXX_STANDARD_INCLUDE_DIRECTORIES={files.include}")


def has_driver_library(nvcc: str, roots: Sequence[Path] | None = None) -> bool:
    """Whether cmake will find `libcuda.so`: the driver's (with its -dev link) or the toolkit's
    link stubs."""
    toolkit = Path(nvcc).resolve().parent.parent
    if roots is None:
        roots = [toolkit / "lib64" / "stubs", *sorted(toolkit.glob("targets/*/lib/stubs")),
                 toolkit / "lib64", Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu"),
                 Path("/usr/lib64"), Path("/usr/lib"), Path("/usr/lib/wsl/lib")]
    return any((root / "libcuda.so").exists() for root in roots)


def cuda_dependency_flags(nvcc: str, *, check: Callable[[str], None], cache_root: Path,
                          version: Callable[[str], str], note: Note,
                          download: Download = pip_download,
                          driver_roots: Sequence[Path] | None = None) -> tuple[str, ...]:
    """The cmake flags that make the cuda variant link here: cuBLAS from PyPI when `check`
    finds none in the toolkit, VMM off without the driver library."""
    flags: list[str] = []
    try:
        check(nvcc)
    except EngineError as missing:
        try:
            files = fetch_cublas(version(nvcc), cache_root, note, download)
        except EngineError as exc:
            raise EngineError(f"{missing}; fetching it from PyPI failed too: {exc}") from None
        flags += cublas_cmake_flags(files)
    if not has_driver_library(nvcc, driver_roots):
        note("no libcuda.so here (no NVIDIA driver, no toolkit stubs): building without CUDA "
             "VMM (GGML_CUDA_NO_VMM=ON, llama.cpp's legacy memory pool)")
        flags.append("-DGGML_CUDA_NO_VMM=ON")
    return tuple(flags)
