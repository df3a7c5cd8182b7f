"""An engine as a wheel (`lalo engine build --wheel`) and lalo finding engines installed from
wheels: the wheel's name, tag, RECORD and file modes; real pip installing it (executable bits
kept); the registry's order and the engines it skips, each with its reason."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from packaging.utils import parse_wheel_filename
from packaging.version import Version
from typer.testing import CliRunner

from launcher.cli.app import _register, app
from launcher.digest import file_sha256
from launcher.engines.install import BuiltEngine
from launcher.engines.installed import ENTRY_POINT_GROUP, installed_engines
from launcher.engines.registry import (
    MANIFEST,
    EngineManifest,
    ManifestFile,
    engine_key,
    find_llama_server,
    read_manifest,
)
from launcher.engines.source import SDIST_LABEL
from launcher.errors import EngineError, UsageError
from launcher.packaging.targets.engine_wheel import (
    manylinux_tag,
    wheel_version,
    write_engine_wheel,
)

COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
PLATFORM = "linux-x86_64"
# a real ELF for objdump to read (the fakes' own llama-server would be a shell script)
ELF = Path("/bin/true")


def make_engine(root: Path, variant: str = "portable", *, built_at: str = "2026-11-30T10:00:00+00:00",
                server: bytes | None = None) -> Path:
    """An engine directory as the builder installs one: binaries, a library with its
    versioned and development links, a CPU variant module, and the manifest."""
    key = engine_key(COMMIT, variant, PLATFORM)
    engine = root / key
    (engine / "bin").mkdir(parents=True)
    files: list[ManifestFile] = []

    def add(rel: str, data: bytes, executable: bool = False) -> None:
        path = engine / rel
        path.write_bytes(data)
        path.chmod(0o755 if executable else 0o644)
        files.append(ManifestFile(rel, path.stat().st_size, file_sha256(path)))

    add("bin/llama-server", server or b"#!/bin/sh\necho 'version: 7 (0c1e570)' >&2\n", True)
    add("bin/llama-quantize", b"#!/bin/sh\n", True)
    add("bin/libggml.so.0.9.4", b"the library", True)
    for name, target in (("libggml.so.0", "libggml.so.0.9.4"), ("libggml.so", "libggml.so.0")):
        (engine / "bin" / name).symlink_to(target)
        files.append(ManifestFile(f"bin/{name}", link=target))
    add("bin/libggml-cpu-haswell.so", b"haswell", True)
    manifest = EngineManifest(
        key=key, commit=COMMIT, commit_origin="git", source=SDIST_LABEL, variant=variant,
        platform=PLATFORM, cmake_flags=("-DGGML_NATIVE=OFF",), compiler="gcc 10.2.1",
        files=tuple(files), build_seconds=900.0, lalo_version="0.1.0", built_at=built_at,
    )
    (engine / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2))
    read_manifest(engine)  # a complete engine
    return engine


def glibc_231(files: object) -> str:
    return "2.31"


def test_the_wheel_is_named_tagged_and_recorded(tmp_path: Path) -> None:
    engine = make_engine(tmp_path / "engines")
    made = write_engine_wheel(engine, tmp_path / "dist", glibc_of=glibc_231,
                              libraries_of=lambda files: ["libgomp.so.1"])
    assert made.path.name == "lalo_engine_portable-0.3.36-py3-none-manylinux_2_31_x86_64.whl"
    name, version, _, tags = parse_wheel_filename(made.path.name)
    assert (name, version) == ("lalo-engine-portable", Version("0.3.36"))
    assert {str(tag) for tag in tags} == {"py3-none-manylinux_2_31_x86_64"}
    with zipfile.ZipFile(made.path) as wheel:
        names = wheel.namelist()
        info = "lalo_engine_portable-0.3.36.dist-info"
        assert names[-1] == f"{info}/RECORD"
        record = wheel.read(f"{info}/RECORD").decode().splitlines()
        assert record[-1] == f"{info}/RECORD,,"
        for line in record[:-1]:  # every member, its sha256 and size (PEP 376)
            member, digest, size = line.split(",")
            data = wheel.read(member)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == f"sha256={expected.decode()}" and int(size) == len(data)
        assert sorted(line.split(",")[0] for line in record) == sorted(names)
        modes = {n: wheel.getinfo(n).external_attr >> 16 for n in names}
        package = "lalo_engine_portable/engine/bin"
        assert modes[f"{package}/llama-server"] == stat.S_IFREG | 0o755
        assert modes[f"{info}/METADATA"] == stat.S_IFREG | 0o644
        # no links in a wheel: the name the binaries load is a copy, the linker's name is gone
        assert wheel.read(f"{package}/libggml.so.0") == b"the library"
        assert f"{package}/libggml.so" not in names
        packaged = json.loads(wheel.read("lalo_engine_portable/engine/manifest.json"))
        assert packaged["glibc"] == "2.31" and packaged["system_libraries"] == ["libgomp.so.1"]
        assert all("link" not in entry for entry in packaged["files"])
        meta = wheel.read(f"{info}/METADATA").decode()
        assert "Name: lalo-engine-portable\nVersion: 0.3.36\n" in meta and "License: MIT" in meta
        assert "needs glibc 2.31 or later and these libraries from the system: libgomp.so.1" in meta
        assert wheel.read(f"{info}/WHEEL").decode().endswith(
            "Root-Is-Purelib: false\nTag: py3-none-manylinux_2_31_x86_64\n")
        assert wheel.read(f"{info}/entry_points.txt").decode() == (
            f"[{ENTRY_POINT_GROUP}]\n{engine.name} = lalo_engine_portable:engine_dir\n")
        notice = wheel.read(f"{info}/licenses/NOTICE").decode()
        assert "llama.cpp (llama-server)" in notice and "Licence: MIT License (MIT)" in notice
        assert "MIT License" in wheel.read(f"{info}/licenses/LICENSE").decode()
        assert "lalo" in wheel.read(f"{info}/licenses/NOTICE.lalo").decode()


def test_the_same_engine_gives_the_same_bytes(tmp_path: Path) -> None:
    engine = make_engine(tmp_path / "engines")
    first = write_engine_wheel(engine, tmp_path / "a", glibc_of=glibc_231)
    second = write_engine_wheel(engine, tmp_path / "b", glibc_of=glibc_231)
    assert first.path.read_bytes() == second.path.read_bytes()


def test_the_tag_is_the_newest_glibc_the_binaries_need(tmp_path: Path) -> None:
    engine = make_engine(tmp_path / "engines", server=ELF.read_bytes())
    made = write_engine_wheel(engine, tmp_path / "dist")  # objdump -T and -p on the real ELF
    with zipfile.ZipFile(made.path) as wheel:
        packaged = json.loads(wheel.read("lalo_engine_portable/engine/manifest.json"))
    assert packaged["system_libraries"] == []  # /bin/true needs only glibc's libc.so.6
    needed = subprocess.run(["objdump", "-T", str(ELF)], capture_output=True, text=True,
                            check=True).stdout
    newest = max((tuple(int(p) for p in found.split("."))
                  for found in re.findall(r"\bGLIBC_(2\.[\d.]+)\b", needed)), default=None)
    assert newest is not None
    assert made.tag == f"py3-none-manylinux_{newest[0]}_{newest[1]}_x86_64"


def test_versions_and_platforms() -> None:
    manifest = read_manifest_like(source=SDIST_LABEL)
    assert wheel_version(manifest) == "0.3.36"
    patched = replace(manifest, extra={"patches_id": "1a2b3c4d5e6f"})
    assert wheel_version(patched) == "0.3.36+p1a2b3c4d" and str(Version("0.3.36+p1a2b3c4d"))
    own = wheel_version(read_manifest_like(source="/src/llama.cpp"))
    assert own == "0+g0c1e570" and str(Version(own)) == own
    assert manylinux_tag("linux-arm64", "2.31") == "py3-none-manylinux_2_31_aarch64"
    with pytest.raises(EngineError, match="Linux engine wheels"):
        manylinux_tag("windows-x86_64", "2.31")


def read_manifest_like(source: str) -> EngineManifest:
    return EngineManifest(
        key="k", commit=COMMIT, commit_origin="git", source=source, variant="native",
        platform=PLATFORM, cmake_flags=(), compiler="gcc", files=(), build_seconds=1.0,
        lalo_version="0.1.0", built_at="2026-11-30T10:00:00+00:00",
    )


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The portable engine's wheel installed by real pip into a folder on sys.path."""
    engine = make_engine(tmp_path / "engines")
    made = write_engine_wheel(engine, tmp_path / "dist", glibc_of=glibc_231)
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
         "--disable-pip-version-check", "--target", str(target), str(made.path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    monkeypatch.syspath_prepend(str(target))
    return target


def test_pip_installs_it_executable_and_lalo_finds_it(installed: Path, tmp_path: Path) -> None:
    server = installed / "lalo_engine_portable" / "engine" / "bin" / "llama-server"
    assert os.access(server, os.X_OK)  # pip kept the mode
    found, skipped = installed_engines(PLATFORM)
    assert skipped == []
    assert [(e.directory, e.distribution) for e in found] == [
        (server.parent.parent.resolve(), "lalo-engine-portable 0.3.36")]
    engine = find_llama_server("auto", "native", engines_root=tmp_path / "empty",
                               which=lambda name: None, probe=lambda binary: None)
    assert engine is not None and engine.origin == "wheel" and engine.variant == "portable"
    assert engine.origin_text == "installed from wheel lalo-engine-portable 0.3.36"


def test_engine_list_names_the_wheel(installed: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LALO_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("LALO_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    monkeypatch.chdir(tmp_path)
    _register(["engine"])
    result = CliRunner().invoke(app, ["engine", "list"])
    assert result.exit_code == 0, result.output
    row = result.stdout.splitlines()[1]
    assert row.startswith("*  installed from wheel lalo-engine-portable 0.3.36  portable")


def engine_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, returns: str) -> object:
    """An entry point of the lalo.engines group whose function returns `returns`."""
    module = tmp_path / "mods" / "fake_engine_dist.py"
    module.parent.mkdir(exist_ok=True)
    module.write_text(f"def engine_dir():\n    return {returns}\n")
    monkeypatch.syspath_prepend(str(module.parent))
    sys.modules.pop("fake_engine_dist", None)
    from importlib.metadata import EntryPoint

    return EntryPoint("fake", "fake_engine_dist:engine_dir", ENTRY_POINT_GROUP)


def test_an_engine_that_cannot_run_here_is_skipped_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(tmp_path / "engines")
    manifest = json.loads((engine / MANIFEST).read_text())
    (engine / MANIFEST).write_text(json.dumps({**manifest, "glibc": "2.36"}))
    entry = engine_entry_point(tmp_path, monkeypatch, repr(str(engine)))

    def points() -> list[object]:
        return [entry]

    found, skipped = installed_engines(PLATFORM, entry_points=points,  # type: ignore[arg-type]
                                       glibc=lambda: "2.31")
    assert found == [] and [s.reason for s in skipped] == [
        "needs glibc 2.36 or later, this system has 2.31"]
    found, skipped = installed_engines(PLATFORM, entry_points=points,  # type: ignore[arg-type]
                                       glibc=lambda: "2.36")
    assert len(found) == 1 and skipped == []
    (engine / "bin" / "llama-server").chmod(0o644)  # unpacked by a tool that dropped the modes
    _, skipped = installed_engines(PLATFORM, entry_points=points,  # type: ignore[arg-type]
                                   glibc=lambda: "2.36")
    assert skipped[0].reason.endswith("is not executable (installed without its file modes?)")
    _, skipped = installed_engines("linux-arm64", entry_points=points,  # type: ignore[arg-type]
                                   glibc=lambda: "2.36")
    assert skipped[0].reason == "built for linux-x86_64, this system is linux-arm64"


def test_a_broken_entry_point_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = engine_entry_point(tmp_path, monkeypatch, "1 / 0")
    _, skipped = installed_engines(PLATFORM, entry_points=lambda: [entry])  # type: ignore[list-item]
    assert skipped[0].reason == "its entry point fake_engine_dist:engine_dir failed: division by zero"
    missing = engine_entry_point(tmp_path, monkeypatch, repr(str(tmp_path / "gone")))
    _, skipped = installed_engines(PLATFORM, entry_points=lambda: [missing])  # type: ignore[list-item]
    assert "no manifest.json; not a built engine" in skipped[0].reason


def test_built_here_comes_before_a_wheel_of_the_same_variant(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    native = make_engine(cache, "native")
    wheel_portable = make_engine(tmp_path / "wheel-a", "portable")
    wheel_native = make_engine(tmp_path / "wheel-b", "native")

    def pick(variant: str, wheels: list[Path], root: Path = cache) -> tuple[str, Path]:
        listed = [(w, read_manifest(w), f"lalo-engine-{read_manifest(w).variant} 0.3.36")
                  for w in wheels]
        found = find_llama_server("auto", variant, engines_root=root, which=lambda name: None,
                                  probe=lambda binary: None, installed=lambda: listed)
        assert found is not None
        return found.origin, found.directory.parent

    assert pick("native", [wheel_native, wheel_portable]) == ("cache", native)
    # the variant asked for from a wheel beats another variant built here
    assert pick("portable", [wheel_native, wheel_portable]) == ("wheel", wheel_portable)
    assert pick("cuda", [wheel_portable]) == ("cache", native)
    assert pick("cuda", [wheel_portable], tmp_path / "none") == ("wheel", wheel_portable)


def test_a_wheel_of_a_windows_engine_is_refused_in_one_line(tmp_path: Path) -> None:
    _register(["engine"])
    result = CliRunner().invoke(app, ["engine", "build", "--wheel", "--platform", "windows"])
    assert isinstance(result.exception, UsageError)
    assert "\n" not in str(result.exception)
    assert str(result.exception).startswith("--wheel makes Linux engine wheels")


def test_build_wheel_reuses_the_built_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(tmp_path / "engines", "native", server=ELF.read_bytes())
    asked: list[str] = []

    def built(variant: str, *args: object, **kwargs: object) -> BuiltEngine:
        asked.append(variant)
        return BuiltEngine(key=engine.name, path=engine, server=engine / "bin" / "llama-server",
                           manifest=read_manifest(engine), already_built=True, log_path=None)

    monkeypatch.setattr("launcher.cli.commands_engine.build_engine", built)
    _register(["engine"])
    out = tmp_path / "dist"
    result = CliRunner().invoke(app, ["engine", "build", "--wheel", "--variant", "native",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert asked == ["native"]
    lines = result.stdout.splitlines()
    assert lines[0] == f"already built: {engine / 'bin' / 'llama-server'}"
    (wheel,) = out.iterdir()
    assert wheel.name.startswith("lalo_engine_native-0.3.36-py3-none-manylinux_2_")
    assert lines[1].startswith(f"wheel {wheel}")
    shutil.rmtree(out)
    CliRunner().invoke(app, ["engine", "build", "--wheel"])
    assert asked[-1] == "portable"  # the default for a wheel: it is meant for other machines
