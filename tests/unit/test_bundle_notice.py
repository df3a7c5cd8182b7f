"""NOTICE and LICENSES/ from what is packaged; the generated lalo.yaml; what the engine ships."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from launcher.config import parse_config, resolve_path
from launcher.engines.install import BuiltEngine
from launcher.engines.registry import EngineManifest, ManifestFile
from launcher.engines.source import SDIST_LABEL
from launcher.packaging import layout
from launcher.packaging.inputs import ModelInput, model_inputs
from launcher.packaging.notices.frozen_notice import python_components
from launcher.packaging.notices.notice import (
    Packaged,
    engine_components,
    engine_source_tree,
    model_components,
    notice_text,
    write_notice,
)
from launcher.packaging.spec import BundleSpec, parse_spec

SPEC = """\
name: demo
models:
  open: {file: open.gguf, license: Apache-2.0, ctx_size: 1024, aliases: [o], parallel: 2}
  liquid: {catalog: lfm2-350m-extract}
  again: {file: open.gguf, license: Apache-2.0, ctx_size: 512}
licenses: {allow: [lfm1.0]}
proxy: {port: 9100}
resources: {ram_reserve: 512MiB}
"""


def manifest(variant: str = "portable", source: str = "/nowhere") -> EngineManifest:
    return EngineManifest(
        key=f"llama.cpp-0c1e570-{variant}-linux-x86_64", commit="0c1e57098bba43ac29e6e3b6",
        commit_origin="git", source=source, variant=variant, platform="linux-x86_64",
        cmake_flags=("-DGGML_NATIVE=OFF",), compiler="gcc 12",
        files=(
            ManifestFile("bin/llama-server", 10, "a" * 64),
            ManifestFile("bin/llama-quantize", 10, "b" * 64),
            ManifestFile("bin/libggml-cpu-haswell.so", 10, "c" * 64),
            ManifestFile("bin/libggml.so.0.9.4", 10, "d" * 64),
            ManifestFile("bin/libggml.so.0", link="libggml.so.0.9.4"),
        ),
        build_seconds=1.0, lalo_version="0.1.0", built_at="2026-01-01T00:00:00+00:00",
    )


@pytest.fixture
def spec(tmp_path: Path) -> BundleSpec:
    path = tmp_path / "demo.yaml"
    path.write_text(SPEC)
    (tmp_path / "open.gguf").write_bytes(b"GGUF")
    return parse_spec(SPEC, source=path)


@pytest.fixture
def models(spec: BundleSpec, tmp_path: Path) -> list[ModelInput]:
    found = model_inputs(spec)
    # the catalog model "downloaded" to a hub-like path
    hub = tmp_path / "hub" / "LFM2-350M-Extract-Q4_K_M.gguf"
    hub.parent.mkdir()
    hub.write_bytes(b"GGUF")
    return [m if m.catalog is None else dataclasses.replace(m, path=hub) for m in found]


def test_engine_components_read_texts_from_the_source_tree(tmp_path: Path) -> None:
    tree = tmp_path / "llama.cpp"
    (tree / "vendor" / "cpp-httplib").mkdir(parents=True)
    (tree / "CMakeLists.txt").write_text("")
    (tree / "LICENSE").write_text("MIT License\n\nCopyright (c) the ggml authors\n")
    (tree / "vendor" / "cpp-httplib" / "LICENSE").write_text("httplib MIT text\n")
    (tree / "vendor" / "stb").mkdir()
    (tree / "vendor" / "stb" / "stb_image.h").write_text(
        "/* code */\n/*\nThis software is available under 2 licenses -- choose.\nMIT...\n*/\n")
    parts, warnings = engine_components(manifest(source=str(tree)), tree)
    by_name = {p.component.name: p for p in parts}
    main = by_name["llama.cpp (llama-server)"]
    assert main.component.license_id == "MIT" and main.component.version == "0c1e570"
    assert main.files[0].text.startswith("MIT License")
    assert by_name["cpp-httplib"].files[0].text == "httplib MIT text\n"
    assert by_name["stb_image"].files[0].text.startswith("This software is available under 2")
    # what the fake tree lacks is named, and still gets a standard text where one exists
    assert not any(w.startswith(("cpp-httplib", "stb_image")) for w in warnings)
    assert any(w.startswith("subprocess.h") for w in warnings)
    assert by_name["xxHash"].files[0].text.startswith("{copyright}".replace("{copyright}", "Copyright"))


def test_every_vendored_licence_is_found_in_the_real_llama_cpp_tree() -> None:
    tree = engine_source_tree(manifest(source=SDIST_LABEL))
    if tree is None:
        pytest.skip("the llama.cpp source is not in lalo's cache (lalo engine build fetches it)")
    parts, warnings = engine_components(manifest(source=SDIST_LABEL), tree)
    assert warnings == []
    for part in parts:
        assert part.files and all(len(f.text) > 30 for f in part.files), part.component.name


def test_engine_components_without_the_tree_fall_back_to_standard_texts() -> None:
    parts, warnings = engine_components(manifest(), None)
    assert parts[0].files[0].text.startswith("MIT License")
    assert any("source tree not found" in w for w in warnings)


def test_model_components_ship_texts_or_point_at_them(
    models: list[ModelInput], tmp_path: Path
) -> None:
    parts, warnings = model_components(models, {})
    open_part, liquid_part, _ = parts
    assert open_part.component.license_id == "Apache-2.0"
    assert "Apache License" in open_part.files[0].text  # the full standard text
    assert liquid_part.component.license_id == "lfm1.0"
    assert "https://www.liquid.ai/lfm-open-license-v1.0" in liquid_part.files[0].text
    assert "allowed because the bundle spec names this licence" in (liquid_part.component.note or "")
    assert any("liquid" in w and "licenses.texts" in w for w in warnings)
    text = tmp_path / "lfm.txt"
    text.write_text("LFM OPEN LICENSE v1.0 full text\n")
    parts, warnings = model_components(models, {"LFM1.0": text})
    assert parts[1].files[0].text == "LFM OPEN LICENSE v1.0 full text\n"
    assert not warnings


def test_python_components_come_from_the_installed_distributions() -> None:
    parts, _ = python_components(
        ["httpx._client", "yaml", "pydantic_core._pydantic_core", "launcher.cli", "os"], []
    )
    names = [p.component.name for p in parts]
    assert names[:3] == ["lalo-launcher", "CPython", "PyInstaller bootloader"]
    assert {"httpx", "PyYAML", "pydantic_core"} <= set(names)
    assert "os" not in names  # the standard library is CPython's
    by_name = {p.component.name: p for p in parts}
    assert by_name["httpx"].component.license_id == "BSD-3-Clause"
    assert by_name["PyYAML"].files and "Permission is hereby granted" in by_name["PyYAML"].files[0].text
    assert by_name["CPython"].component.license_id == "PSF-2.0"


def test_unknown_system_libraries_are_named_with_a_warning(tmp_path: Path) -> None:
    lib = tmp_path / "libmystery.so.1"
    lib.write_bytes(b"\x7fELF")
    parts, warnings = python_components([], [("libmystery.so.1", str(lib))])
    assert parts[-1].component.name == "libmystery.so.1"
    assert parts[-1].component.license_id == "unknown"
    assert any("libmystery.so.1" in w for w in warnings)


def test_write_notice_lists_every_component_and_its_files(tmp_path: Path,
                                                          models: list[ModelInput]) -> None:
    parts, _ = model_components(models, {})
    engine, _ = engine_components(manifest(), None)
    stale = tmp_path / "out" / "LICENSES" / "old.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("from a previous build")
    written = write_notice(tmp_path / "out", "demo bundle", [*engine, *parts])
    notice = (tmp_path / "out" / "NOTICE").read_text()
    assert notice.startswith("demo bundle\n")
    for item in [*engine, *parts]:
        assert item.component.name in notice
        for license_file in item.files:
            assert f"LICENSES/{license_file.name}" in notice
            assert (tmp_path / "out" / "LICENSES" / license_file.name).read_text() == license_file.text
    assert "Terms: Apache-2.0-based with attribution" in notice  # the custom licence's terms
    assert not stale.exists()
    assert written == sorted(written)


def test_packaged_round_trips_through_json(models: list[ModelInput]) -> None:
    parts, _ = model_components(models, {})
    again = [Packaged.from_json(p.to_json()) for p in parts]
    assert again == parts
    assert notice_text("x", again) == notice_text("x", parts)


def test_bundled_config_loads_and_keeps_each_models_settings(
    spec: BundleSpec, models: list[ModelInput]
) -> None:
    files = layout.model_file_names(models)
    assert files == {"open": "open.gguf", "liquid": "LFM2-350M-Extract-Q4_K_M.gguf",
                     "again": "open.gguf"}  # one copy of a file two models use
    text = layout.bundled_config(
        spec, models, {n: f"models/{f}" for n, f in files.items()},
        engine_path=layout.bundle_engine_path(), variant="portable", header="# generated\n",
    )
    assert text.startswith("# generated\n")
    config = parse_config(text, label="x", total_ram=1 << 40)
    assert config.proxy.port == 9100 and config.resources.ram_reserve == 512 * 1024**2
    assert config.engines.llama_server.path == "${LALO_BUNDLE_DIR}/bin"
    assert config.models["open"].file == "models/open.gguf"
    assert config.models["open"].aliases == ("o",) and config.models["open"].parallel == 2
    assert config.models["liquid"].catalog is None and config.models["liquid"].license == "lfm1.0"
    assert config.models["again"].ctx_size == 512


def test_engine_path_expands_to_the_bundle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LALO_BUNDLE_DIR", str(tmp_path))
    assert resolve_path(layout.bundle_engine_path(), Path("/elsewhere")) == tmp_path / "bin"
    monkeypatch.setenv("LALO_MODELS_DIR", str(tmp_path / "m"))
    assert resolve_path(layout.embedded_model_path("a.gguf"), Path("/x")) == tmp_path / "m" / "a.gguf"


def test_engine_files_are_the_server_and_its_libraries(tmp_path: Path) -> None:
    built = BuiltEngine(key="k", path=tmp_path, server=tmp_path / "bin" / "llama-server",
                        manifest=manifest(), already_built=True, log_path=None)
    assert [f.path for f in layout.engine_files(built)] == [
        "bin/libggml-cpu-haswell.so", "bin/libggml.so.0", "bin/libggml.so.0.9.4",
        "bin/llama-server",
    ]


def test_start_script_runs_the_frozen_lalo_from_its_own_folder(tmp_path: Path) -> None:
    [script] = layout.write_start_scripts(tmp_path, 8080)
    text = script.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert 'exec "$here/lalo/lalo" "$@"' in text
    assert script.stat().st_mode & 0o111 == 0o111
