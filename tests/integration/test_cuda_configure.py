"""The cuda variant with cuBLAS from NVIDIA's PyPI wheel: the real builder runs the real cmake
configure + generate on the pinned llama.cpp source, then compiles one CUDA object of ggml-cuda
for sm_90 (a whole CUDA build takes hours on 2 cores: docs/gpu.md has the extrapolation).

Runs where nvcc is installed and the wheel is already extracted in lalo's cache (a build with
`lalo engine build --variant cuda` on a toolkit without cuBLAS does that; the wheel is 420 MB,
so the test never downloads it); skipped elsewhere.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from launcher import paths
from launcher.engines.builder import EngineBuilder
from launcher.engines.cmake import run_command
from launcher.engines.cuda_deps import MARKER
from launcher.engines.toolchain import check_cuda_libraries
from launcher.errors import EngineError

NVCC = shutil.which("nvcc")
CUBLAS = paths.cache_dir() / "cuda"
SOURCES = paths.cache_dir() / "sources"


class CompiledOne(Exception):
    """Stops the build after the one object: nothing is installed."""


def _cublas_cached() -> bool:
    return any((folder / MARKER).is_file() for folder in CUBLAS.glob("cublas-*"))


@pytest.mark.skipif(NVCC is None, reason="no nvcc: the CUDA toolkit is not installed")
@pytest.mark.skipif(not _cublas_cached(), reason="cuBLAS wheel not in lalo's cache")
@pytest.mark.timeout(900)
def test_cuda_configure_and_one_object_with_the_wheels_cublas(tmp_path: Path) -> None:
    try:
        check_cuda_libraries(str(NVCC))
        pytest.skip("this toolkit has its own cuBLAS: the wheel is not used")
    except EngineError:
        pass
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cuda").symlink_to(CUBLAS)  # the cached wheel and pinned source, not copies
    (cache / "sources").symlink_to(SOURCES)
    compiled: list[Path] = []

    def runner(argv: Sequence[str], *, cwd: Path, on_line: Callable[[str], None]) -> int:
        if "--build" not in argv:
            return run_command(argv, cwd=cwd, on_line=on_line)
        cuda_dir = cwd / "ggml" / "src" / "ggml-cuda"
        code = run_command(["make", "acc.o"], cwd=cuda_dir, on_line=on_line)
        compiled.extend(cuda_dir.glob("CMakeFiles/ggml-cuda.dir/acc.cu.o"))
        raise CompiledOne(code)

    notes: list[str] = []
    builder = EngineBuilder(engines_root=tmp_path / "engines", cache_root=cache, runner=runner)
    with pytest.raises(CompiledOne) as stopped:
        builder.build("cuda", cuda_archs=["90"], jobs=1,
                      progress=lambda event: notes.append(event.message))
    assert stopped.value.args == (0,)
    assert compiled and compiled[0].stat().st_size > 0
    assert any(note.startswith("cuBLAS from nvidia_cublas-") for note in notes)
    log = next((cache / "logs").glob("engine-build-*-cuda-*.log")).read_text()
    assert "Generating done" in log and "CMake Error" not in log
    assert "-DCUDA_cublas_LIBRARY=" in log or "CUDA_cublas_LIBRARY" in (
        next((cache / "build").iterdir()) / "CMakeCache.txt").read_text()
