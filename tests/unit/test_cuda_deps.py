"""cuBLAS from NVIDIA's PyPI wheel for a toolkit without it, and the driver-library check.

The wheel here is a small zip laid out like nvidia-cublas 13.0.0.19's (checked by hand: headers
in nvidia/cu13/include/, libcublas.so.13 and libcublasLt.so.13 in nvidia/cu13/lib/); pip is
replaced by a function that returns it (the real download is 420 MB: the configure test in
tests/integration/test_cuda_configure.py uses the real wheel where it is cached).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from launcher.engines.builder import EngineBuilder
from launcher.engines.cuda_deps import (
    cublas_cmake_flags,
    cuda_dependency_flags,
    extract_cublas,
    fetch_cublas,
    has_driver_library,
    wheel_requirement,
)
from launcher.errors import EngineError


def fake_wheel(folder: Path, prefix: str = "nvidia/cu13") -> Path:
    wheel = folder / "nvidia_cublas-13.0.0.19-py3-none-manylinux_2_27_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in ("cublas_v2.h", "cublas_api.h", "cublasLt.h"):
            archive.writestr(f"{prefix}/include/{name}", f"/* {name} */\n")
        archive.writestr(f"{prefix}/lib/libcublas.so.13", b"\x7fELF cublas")
        archive.writestr(f"{prefix}/lib/libcublasLt.so.13", b"\x7fELF cublasLt")
        archive.writestr(f"{prefix}/lib/libnvblas.so.13", b"\x7fELF nvblas")
        archive.writestr("nvidia_cublas-13.0.0.19.dist-info/METADATA", "Name: nvidia-cublas\n")
    return wheel


def test_the_wheel_matches_nvccs_major_and_minor() -> None:
    assert wheel_requirement("13.0.88") == "nvidia-cublas>=13.0,<13.1"
    assert wheel_requirement("12.4.131") == "nvidia-cublas-cu12>=12.4,<12.5"
    with pytest.raises(EngineError, match="no cuBLAS wheel known for CUDA 11"):
        wheel_requirement("11.8.89")
    with pytest.raises(EngineError, match="cannot tell the CUDA version"):
        wheel_requirement("Cuda compilation tools")


def test_extract_keeps_headers_and_the_two_libraries_with_unversioned_links(tmp_path: Path) -> None:
    files = extract_cublas(fake_wheel(tmp_path), tmp_path / "out")
    assert (files.include / "cublas_v2.h").read_text() == "/* cublas_v2.h */\n"
    assert files.cublas.is_symlink() and files.cublas.resolve().name == "libcublas.so.13"
    assert files.cublas_lt.resolve().read_bytes() == b"\x7fELF cublasLt"
    assert not (tmp_path / "out" / "lib" / "libnvblas.so.13").exists()
    assert cublas_cmake_flags(files) == (
        f"-DCUDA_cublas_LIBRARY={files.cublas}", f"-DCUDA_cublasLt_LIBRARY={files.cublas_lt}",
        f"-DCMAKE_CUDA_STANDARD_INCLUDE_DIRECTORIES={files.include}",
        f"-DCMAKE_CXX_STANDARD_INCLUDE_DIRECTORIES={files.include}")
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("nvidia/cu13/lib/libcudart.so.13", b"")
    with pytest.raises(EngineError, match=r"other\.whl has no cublas_v2\.h"):
        extract_cublas(other, tmp_path / "bad")


def test_fetched_once_then_taken_from_the_cache(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path)
    asked: list[str] = []
    notes: list[str] = []

    def download(requirement: str, dest: Path) -> Path:
        asked.append(requirement)
        return wheel

    first = fetch_cublas("13.0.88", tmp_path / "cache", notes.append, download)
    second = fetch_cublas("13.0.48", tmp_path / "cache", notes.append, download)
    assert asked == ["nvidia-cublas>=13.0,<13.1"] and first == second
    assert first.cublas.parent == tmp_path / "cache" / "cuda" / "cublas-13.0" / "lib"
    assert notes[0].startswith("the CUDA toolkit has no cuBLAS: fetching nvidia-cublas>=13.0,<13.1")
    assert notes[-1].startswith("cuBLAS from nvidia_cublas-13.0.0.19")
    # nothing half-made is left beside it
    assert sorted(p.name for p in (tmp_path / "cache" / "cuda").iterdir()) == ["cublas-13.0"]


def test_flags_only_when_the_toolkit_lacks_cublas_and_errors_say_both(tmp_path: Path) -> None:
    def lacks(nvcc: str) -> None:
        raise EngineError("the cuda variant needs cuBLAS, which the CUDA toolkit of nvcc lacks")

    driver = tmp_path / "driver"
    driver.mkdir()
    (driver / "libcuda.so").write_bytes(b"")
    common = {"cache_root": tmp_path / "cache", "version": lambda nvcc: "13.0.88",
              "note": lambda text: None, "driver_roots": [driver]}
    assert cuda_dependency_flags("/usr/bin/nvcc", check=lambda nvcc: None, **common) == ()  # type: ignore[arg-type]
    flags = cuda_dependency_flags("/usr/bin/nvcc", check=lacks,  # type: ignore[arg-type]
                                  download=lambda req, dest: fake_wheel(dest), **common)
    assert any(flag.startswith("-DCUDA_cublas_LIBRARY=") for flag in flags)

    def offline(requirement: str, dest: Path) -> Path:
        raise EngineError(f"pip download {requirement} failed: No matching distribution found")

    with pytest.raises(EngineError) as caught:
        cuda_dependency_flags("/usr/bin/nvcc", check=lacks, download=offline,  # type: ignore[arg-type]
                              **{**common, "cache_root": tmp_path / "cache2"})
    assert str(caught.value) == (
        "the cuda variant needs cuBLAS, which the CUDA toolkit of nvcc lacks; fetching it from "
        "PyPI failed too: pip download nvidia-cublas>=13.0,<13.1 failed: No matching "
        "distribution found")


def test_without_the_driver_library_vmm_is_off(tmp_path: Path) -> None:
    assert not has_driver_library("/usr/bin/nvcc", [tmp_path])
    notes: list[str] = []
    flags = cuda_dependency_flags("/usr/bin/nvcc", check=lambda nvcc: None, cache_root=tmp_path,
                                  version=lambda nvcc: "13.0.88", note=notes.append,
                                  driver_roots=[tmp_path])
    assert flags == ("-DGGML_CUDA_NO_VMM=ON",) and "GGML_CUDA_NO_VMM=ON" in notes[0]
    (tmp_path / "stubs").mkdir()
    (tmp_path / "stubs" / "libcuda.so").write_bytes(b"")
    assert has_driver_library("/usr/bin/nvcc", [tmp_path / "stubs"])


def test_the_builder_configures_with_the_wheels_cublas(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.test_engine_builder import FakeCMake, which_all

    monkeypatch.delenv("CUDACXX", raising=False)

    def lacks(nvcc: str) -> None:
        raise EngineError("no cublas_v2.h")

    runner = FakeCMake()
    builder = EngineBuilder(
        engines_root=tmp_path / "engines", cache_root=tmp_path, runner=runner, which=which_all,
        compiler_probe=lambda cc: "cc (Fake) 12.2.0", nvcc_probe=lambda nvcc: "13.0.88",
        cuda_check=lacks, cublas_download=lambda req, dest: fake_wheel(dest))
    tree = tmp_path / "llama.cpp"
    (tree / "tools" / "server").mkdir(parents=True)
    (tree / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    built = builder.build("cuda", tree, cuda_archs=["90"])
    configure = runner.calls[0]
    lib = tmp_path / "cuda" / "cublas-13.0" / "lib"
    assert f"-DCUDA_cublas_LIBRARY={lib / 'libcublas.so'}" in configure
    assert configure[-1] == "-DCMAKE_CUDA_COMPILER=/usr/bin/nvcc"
    flags = json.loads((built.path / "manifest.json").read_text())["cmake_flags"]
    assert f"-DCUDA_cublasLt_LIBRARY={lib / 'libcublasLt.so'}" in flags


def test_cublas_licence_is_known_and_never_allowed_by_default() -> None:
    from launcher.models.licenses import check_redistribution, lookup

    known = lookup("LicenseRef-NVIDIA-Proprietary")  # what the nvidia-cublas wheel declares
    assert known is not None and not known.spdx and "CUDA EULA" in known.obligation
    refused = check_redistribution("cublas", "LicenseRef-NVIDIA-Proprietary")
    assert not refused.allowed and "custom licence" in refused.reason
    assert check_redistribution("cublas", "LicenseRef-NVIDIA-Proprietary",
                                ["LicenseRef-NVIDIA-Proprietary"]).allowed
