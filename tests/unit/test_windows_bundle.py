"""The Windows bundle's layout (no wine here: tests/integration/test_windows_engine.py runs it):
the engine named for Windows, start.cmd with CRLF lines that runs lalo.exe when present and
llama-server.exe otherwise, lalo.yaml pointing into the bundle, a reproducible zip."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import yaml

from launcher.digest import file_sha256
from launcher.engines.builder import BuiltEngine
from launcher.engines.registry import EngineManifest, ManifestFile
from launcher.errors import PackagingError
from launcher.packaging.inputs import fetch_models, model_inputs
from launcher.packaging.spec import load_spec
from launcher.packaging.targets.windows_bundle import build_windows_bundle


def fake_engine(tmp_path: Path, platform: str = "windows-x86_64") -> BuiltEngine:
    engine = tmp_path / "engine"
    (engine / "bin").mkdir(parents=True, exist_ok=True)
    exe = engine / "bin" / "llama-server.exe"
    exe.write_bytes(b"MZ fake exe")
    manifest = EngineManifest(
        key="llama.cpp-0c1e570-portable-windows-x86_64", commit="0" * 40, commit_origin="git",
        source="test", variant="portable", platform=platform, cmake_flags=(),
        compiler="x86_64-w64-mingw32-gcc-posix (GCC) 12", files=(ManifestFile(
            path="bin/llama-server.exe", size=exe.stat().st_size, sha256=file_sha256(exe)),),
        build_seconds=1.0, lalo_version="0", built_at="2026-11-29T00:00:00+00:00",
    )
    return BuiltEngine(key=manifest.key, path=engine, server=exe, manifest=manifest,
                       already_built=True, log_path=None)


def spec_and_models(tmp_path: Path, small_model: Path) -> tuple[object, list[object]]:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "targets": ["bundle"], "platforms": ["linux", "windows"],
        "proxy": {"port": 8123},
        "models": {"alpha": {"file": str(small_model), "license": "MIT", "ctx_size": 512}},
    }))
    spec = load_spec(str(path))
    return spec, fetch_models(model_inputs(spec), lambda text: None, None)


def test_windows_bundle_layout_and_start_cmd(tmp_path: Path, small_model: Path) -> None:
    spec, models = spec_and_models(tmp_path, small_model)
    result = build_windows_bundle(spec, models, tmp_path / "out",  # type: ignore[arg-type]
                                  engine=fake_engine(tmp_path), components=[],
                                  report=lambda text: None)
    bundle = result.directory
    assert bundle.name == "tiny-windows-bundle"
    assert (bundle / "bin" / "llama-server.exe").read_bytes() == b"MZ fake exe"
    assert (bundle / "models" / small_model.name).stat().st_size == small_model.stat().st_size
    start = (bundle / "start.cmd").read_bytes().decode()
    lines = start.split("\r\n")
    assert "\n" not in start.replace("\r\n", "")
    assert 'if exist "%HERE%lalo\\lalo.exe" (' in lines
    assert any(line.startswith('"%HERE%bin\\llama-server.exe" --model "%MODEL%" --alias alpha '
                               "--host 127.0.0.1 --port 8123 -c 512") for line in lines)
    assert f'set "MODEL=%HERE%models\\{small_model.name}"' in lines
    config = yaml.safe_load((bundle / "lalo.yaml").read_text())
    assert config["engines"]["llama_server"] == {"path": "${LALO_BUNDLE_DIR}/bin",
                                                 "variant": "portable"}
    assert config["models"]["alpha"]["file"] == f"models/{small_model.name}"
    assert (bundle / "NOTICE").is_file()
    with zipfile.ZipFile(result.archive) as zf:
        names = zf.namelist()
        assert names == sorted(names) and "tiny-windows-bundle/start.cmd" in names
        stored = zf.getinfo(f"tiny-windows-bundle/models/{small_model.name}")
        assert stored.compress_type == zipfile.ZIP_STORED
    first = result.archive.read_bytes()
    again = build_windows_bundle(spec, models, tmp_path / "out",  # type: ignore[arg-type]
                                 engine=fake_engine(tmp_path), components=[],
                                 report=lambda text: None)
    assert again.archive.read_bytes() == first


def test_windows_bundle_refuses_a_linux_engine(tmp_path: Path, small_model: Path) -> None:
    spec, models = spec_and_models(tmp_path, small_model)
    with pytest.raises(PackagingError, match="needs a windows-x86_64 engine"):
        build_windows_bundle(spec, models, tmp_path / "out",  # type: ignore[arg-type]
                             engine=fake_engine(tmp_path, "linux-x86_64"), components=[],
                             report=lambda text: None)
