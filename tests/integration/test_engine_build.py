"""`lalo engine build` for real: llama-server compiled from the pinned llama.cpp source (once per
cache), its manifest checked byte for byte, the binary run, and a second build a fast no-op."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.digest import file_sha256
from launcher.engines import patch_series
from launcher.engines.registry import (
    cached_engines,
    find_llama_server,
    find_tool,
    parse_version,
    platform_tag,
    read_manifest,
)
from launcher.engines.source import LLAMA_CPP_PYTHON_VERSION, SDIST_LABEL
from tests.support.engine import test_engine_variant

pytestmark = [pytest.mark.integration, pytest.mark.build]

LALO = [sys.executable, "-m", "launcher"]
VARIANT = test_engine_variant()


def run_lalo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LALO, *args], capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, "LALO_CONFIG": "", "NO_COLOR": "1"},
        cwd=Path(__file__).parent,
    )


def test_manifest_matches_installed_files(llama_server_bin: Path) -> None:
    engine_dir = llama_server_bin.parent.parent
    data = json.loads((engine_dir / "manifest.json").read_text())
    assert data["variant"] == VARIANT and data["platform"] == platform_tag()
    assert data["source"] == SDIST_LABEL
    # lalo's patch series is named in the key and listed in the manifest
    series = [p.name for p in patch_series.series()]
    assert data["patches"] == series and data["patches_id"] == patch_series.series_id(
        patch_series.series())
    assert engine_dir.name == \
        f"llama.cpp-{data['commit'][:7]}-p{data['patches_id']}-{VARIANT}-{platform_tag()}"
    assert f"-DGGML_NATIVE={'ON' if VARIANT == 'native' else 'OFF'}" in data["cmake_flags"]
    assert data["compiler"] and data["build_seconds"] > 0 and data["built_at"]
    paths = {entry["path"] for entry in data["files"]}
    assert {"bin/llama-server", "bin/llama-quantize"} <= paths
    for entry in data["files"]:
        installed = engine_dir / entry["path"]
        if "link" in entry:
            assert installed.is_symlink() and os.readlink(installed) == entry["link"]
            continue
        assert installed.stat().st_size == entry["size"]
        assert file_sha256(installed) == entry["sha256"], entry["path"]
    # Only what the manifest names is installed: nothing half-copied beside it.
    on_disk = {p.relative_to(engine_dir).as_posix() for p in engine_dir.rglob("*") if p.is_file()}
    assert on_disk == paths | {"manifest.json"}


def test_llama_server_reports_the_built_commit(llama_server_bin: Path) -> None:
    manifest = read_manifest(llama_server_bin.parent.parent)
    done = subprocess.run(
        [str(llama_server_bin), "--version"], capture_output=True, text=True, timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    version = parse_version(done.stderr + done.stdout)
    assert version is not None and version[1] == manifest.commit[:7], done.stderr


def test_registry_finds_the_built_engine(llama_server_bin: Path) -> None:
    found = find_llama_server("auto", VARIANT)
    assert found is not None
    assert (found.origin, found.path, found.variant) == ("cache", llama_server_bin, VARIANT)
    assert found.version is not None and found.commit is not None
    assert found.commit[:7] in found.version
    quantize = find_tool(found, "llama-quantize")
    assert quantize is not None
    usage = subprocess.run(
        [str(quantize), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert "usage" in (usage.stdout + usage.stderr).lower()


def test_second_build_is_a_fast_no_op(llama_server_bin: Path) -> None:
    mtime = llama_server_bin.stat().st_mtime_ns
    started = time.monotonic()
    done = run_lalo("engine", "build", "--variant", VARIANT)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"already built: {llama_server_bin}"
    assert elapsed < 15, f"no-op build took {elapsed:.1f} s"
    assert llama_server_bin.stat().st_mtime_ns == mtime


def test_engine_list_shows_it_selected(llama_server_bin: Path, tmp_path: Path) -> None:
    config = tmp_path / "lalo.yaml"  # the variant the tests run, whichever else is built
    config.write_text(f"engines:\n  llama_server:\n    variant: {VARIANT}\nmodels: {{}}\n")
    done = run_lalo("engine", "list", "--json", "--config", str(config))
    assert done.returncode == 0, done.stderr
    entries = {entry["path"]: entry for entry in json.loads(done.stdout)}
    entry = entries[str(llama_server_bin)]
    assert entry["origin"] == "cache" and entry["variant"] == VARIANT
    assert entry["version"] and entry["commit"]
    assert entry["selected"] is True


def test_portable_engine_runs_when_built() -> None:
    """The portable variant takes far longer to build; checked when one is in the cache
    (`lalo engine build --variant portable`)."""
    portable = [
        (d, m) for d, m in cached_engines()
        if m.variant == "portable" and m.source == SDIST_LABEL
    ]
    if not portable:
        pytest.skip(
            f"no portable engine from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} in the cache"
        )
    engine_dir, manifest = portable[0]
    libs = [f.path for f in manifest.files if "libggml-cpu-" in f.path]
    assert len(libs) >= 2, libs
    done = subprocess.run(
        [str(engine_dir / "bin" / "llama-server"), "--version"], capture_output=True, text=True,
        timeout=30, check=False, env={**os.environ, "LD_LIBRARY_PATH": ""},
    )
    output = done.stderr + done.stdout
    assert done.returncode == 0, output
    version = parse_version(output)
    assert version is not None and version[1] == manifest.commit[:7], output
