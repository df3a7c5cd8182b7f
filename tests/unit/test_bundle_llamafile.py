"""`lalo build --target llamafile` end to end, with runtime stand-ins (there is no real llamafile
runtime here): arbitrary bytes, and bytes that already end in a zip. The writer's own
invariants are tested in test_llamafile_writer.py; this checks the target wires them up."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from launcher.errors import PackagingError
from launcher.packaging.build import BuildResult, Packager
from launcher.packaging.files import DigestCache
from launcher.packaging.formats.llamafile_writer import ARGS_ENTRY
from launcher.packaging.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]


def arbitrary_runtime(path: Path) -> bytes:
    data = b"MZqFpD='\n" + random.Random(7).randbytes(300_001)
    path.write_bytes(data)
    path.chmod(0o755)
    return data


def runtime_with_zip(path: Path) -> bytes:
    # As a real runtime: an executable whose tail is a zip with file-absolute offsets.
    path.write_bytes(b"MZqFpD='\n" + random.Random(8).randbytes(100_003))
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("README.txt", "llamafile runtime stand-in\n" * 50)
        archive.writestr(".args", "-m\nold.gguf\n...\n")
    path.chmod(0o755)
    return path.read_bytes()


def write_spec(tmp_path: Path, model: Path, runtime: Path, *, platforms: str = "[linux, windows]",
               sha: str | None = None, extra: str = "") -> Path:
    digest = sha if sha is not None else hashlib.sha256(runtime.read_bytes()).hexdigest()
    spec = tmp_path / "tiny.yaml"
    spec.write_text(f"""\
name: tiny
models:
  chat: {{file: {model}, license: MIT, ctx_size: 1024, parallel: 2, args: [--temp, "0.5"]}}
  embed: {{file: {model}, license: Apache-2.0, ctx_size: 512, embeddings: true, threads: 2}}
engine:
  llamafile: {{runtime: {runtime.name}, sha256: "{digest}"}}
targets: [llamafile]
platforms: {platforms}
{extra}""")
    return spec


def build(tmp_path: Path, spec_path: Path) -> tuple[Packager, BuildResult]:
    spec = parse_spec(spec_path.read_text(), source=spec_path)
    lines: list[str] = []
    packager = Packager(report=lines.append, digests=DigestCache(tmp_path / "digests.json"))
    return packager, packager.build(spec, tmp_path / "dist")


@pytest.mark.parametrize("make_runtime", [arbitrary_runtime, runtime_with_zip])
def test_each_model_becomes_a_llamafile(
    tmp_path: Path, small_model: Path, make_runtime: Callable[[Path], bytes]
) -> None:
    runtime = tmp_path / "llamafile-0.10"
    runtime_bytes = make_runtime(runtime)
    _, result = build(tmp_path, write_spec(tmp_path, small_model, runtime))
    model_bytes = small_model.read_bytes()
    for name, argv in {
        "chat": ["-m", f"/zip/{small_model.name}", "-c", "1024", "-np", "2", "--temp", "0.5"],
        "embed": ["-m", f"/zip/{small_model.name}", "-c", "512", "-t", "2", "--embeddings"],
    }.items():
        out = tmp_path / "dist" / f"{name}.llamafile"
        data = out.read_bytes()
        assert data[: len(runtime_bytes)] == runtime_bytes
        assert os.access(out, os.X_OK)
        with zipfile.ZipFile(out) as archive:
            assert archive.testzip() is None
            args = archive.read(ARGS_ENTRY).decode()
            names = archive.namelist()
            gguf = archive.getinfo(small_model.name)
        assert gguf.compress_type == zipfile.ZIP_STORED
        data_offset = gguf.header_offset + 30 + len(gguf.filename) + 20  # ZIP64 local extra
        assert data_offset % 65536 == 0
        assert data[data_offset : data_offset + gguf.file_size] == model_bytes
        assert names[-2:] == [small_model.name, ARGS_ENTRY]
        assert args == "\n".join([*argv, "..."]) + "\n"
    assert result.llamafiles is not None
    # platforms include windows: the name warning (a .exe name is needed there)
    assert any("ending in .exe" in w for w in result.warnings)
    notice = (tmp_path / "dist" / "llamafile-NOTICE" / "NOTICE").read_text()
    assert "llamafile runtime" in notice and "model chat" in notice and "model embed" in notice
    assert (tmp_path / "dist" / "llamafile-NOTICE" / "LICENSES" / "models" / "chat-MIT.txt").is_file()


def test_unzip_accepts_the_result(tmp_path: Path, small_model: Path) -> None:
    runtime = tmp_path / "rt"
    runtime_with_zip(runtime)
    build(tmp_path, write_spec(tmp_path, small_model, runtime, platforms="[linux]"))
    unzip = subprocess.run(["unzip", "-t", str(tmp_path / "dist" / "chat.llamafile")],
                           capture_output=True, text=True, check=False)
    if unzip.returncode == 127 or "not found" in unzip.stderr:
        pytest.skip("no unzip here")
    assert "No errors detected" in unzip.stdout


def test_no_windows_target_no_windows_warning(tmp_path: Path, small_model: Path) -> None:
    runtime = tmp_path / "rt"
    arbitrary_runtime(runtime)
    _, result = build(tmp_path, write_spec(tmp_path, small_model, runtime, platforms="[linux]"))
    assert not any("Windows" in w for w in result.warnings)


def test_runtime_must_match_its_sha256(tmp_path: Path, small_model: Path) -> None:
    runtime = tmp_path / "rt"
    arbitrary_runtime(runtime)
    with pytest.raises(PackagingError, match=r"has sha256 .* the spec pins 0000"):
        build(tmp_path, write_spec(tmp_path, small_model, runtime, sha="0" * 64))
    assert not (tmp_path / "dist" / "chat.llamafile").exists()


def test_missing_sha256_says_what_to_pin(tmp_path: Path, small_model: Path) -> None:
    runtime = tmp_path / "rt"
    data = arbitrary_runtime(runtime)
    spec = write_spec(tmp_path, small_model, runtime)
    spec.write_text("\n".join(line for line in spec.read_text().splitlines()
                              if "llamafile:" not in line) + "\n  llamafile: {runtime: rt}\n")
    text = spec.read_text().replace("engine:\n", "").replace("  llamafile: {runtime: rt}",
                                                             "engine: {llamafile: {runtime: rt}}")
    spec.write_text(text)
    with pytest.raises(PackagingError, match=hashlib.sha256(data).hexdigest()):
        build(tmp_path, spec)


def test_no_runtime_is_a_clear_error(tmp_path: Path, small_model: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: s\nmodels:\n  m: {{file: {small_model}, license: MIT}}\n"
                    "targets: [llamafile]\n")
    with pytest.raises(PackagingError, match=r"engine\.llamafile\.runtime: the llamafile target needs"):
        build(tmp_path, spec)


def test_cli_builds_llamafiles_and_the_gate_stops_a_refused_model(
    tmp_path: Path, small_model: Path, isolated: dict[str, str]
) -> None:
    runtime = tmp_path / "rt"
    arbitrary_runtime(runtime)
    spec = write_spec(tmp_path, small_model, runtime, platforms="[linux]")
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "build", str(spec), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=isolated, cwd=REPO, check=False, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "chat.llamafile" in done.stdout and (tmp_path / "out" / "embed.llamafile").is_file()
    refused = spec.read_text().replace("license: Apache-2.0", "license: CC-BY-NC-4.0")
    spec.write_text(refused)
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "build", str(spec), "--out", str(tmp_path / "out2")],
        capture_output=True, text=True, env=isolated, cwd=REPO, check=False, timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(
        "lalo: error: licence gate: embed: CC-BY-NC-4.0 is not on the default allow-list")
    assert not (tmp_path / "out2").exists()  # refused before anything was written


def test_a_quantized_kv_cache_is_refused_for_llamafiles(tmp_path: Path, small_model: Path) -> None:
    # lalo passes -ctk/-ctv to llama-server only: a llamafile would run an f16 cache unplanned
    runtime = tmp_path / "llamafile-0.10"
    arbitrary_runtime(runtime)
    spec = write_spec(tmp_path, small_model, runtime)
    spec.write_text(spec.read_text().replace("ctx_size: 1024,", "ctx_size: 1024, kv_cache: q8_0,"))
    with pytest.raises(PackagingError, match=r"models\.chat\.kv_cache: q8_0 needs llama-server"):
        build(tmp_path, spec)


def test_request_rules_are_refused_for_llamafiles(tmp_path: Path, small_model: Path) -> None:
    # lalo's proxy applies them; a llamafile serves its model without it
    runtime = tmp_path / "llamafile-0.10"
    arbitrary_runtime(runtime)
    spec = write_spec(tmp_path, small_model, runtime)
    spec.write_text(spec.read_text().replace("ctx_size: 1024,",
                                             "ctx_size: 1024, set: {temperature: 0},"))
    with pytest.raises(PackagingError, match=r"models\.chat: defaults, set, limits and strip "
                                             r"are applied by lalo's proxy"):
        build(tmp_path, spec)
