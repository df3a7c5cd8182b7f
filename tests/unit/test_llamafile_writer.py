"""The llamafile writer against every invariant of LLAMAFILE.md, with two runtime stand-ins:
arbitrary bytes, and bytes that already end in a zip (deflated entry and an old `.args`).
"""

from __future__ import annotations

import io
import itertools
import os
import random
import shutil
import stat
import struct
import subprocess
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from launcher.errors import PackagingError
from launcher.packaging.formats.llamafile_writer import (
    WINDOWS_MAX_SIZE,
    LlamafileResult,
    append_aligned,
    build_args,
    windows_warnings,
    write_llamafile,
)

EXTRA_ARGS = ("--ctx-size", "512", "-ngl", "0")
RUNTIME_ZIP_ENTRIES = ("README.txt", "lib/kernels.cl", ".args")


@dataclass(frozen=True)
class Runtime:
    path: Path
    data: bytes
    entry_names: tuple[str, ...]


@dataclass(frozen=True)
class Built:
    runtime: Runtime
    model: Path
    model_data: bytes
    out: Path
    result: LlamafileResult

    @property
    def data(self) -> bytes:
        return self.out.read_bytes()


def _random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _make_runtime(tmp_path: Path, kind: str) -> Runtime:
    path = tmp_path / "runtime.com"
    path.write_bytes(b"MZqFpD='\n" + _random_bytes(100_003, seed=1))
    names: tuple[str, ...] = ()
    if kind == "zip":
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr("README.txt", "a runtime's own file\n")
            archive.writestr(
                "lib/kernels.cl", "kernel void k() {}\n" * 200, compress_type=zipfile.ZIP_DEFLATED
            )
            archive.writestr(".args", "--old-default\n...\n")
        names = RUNTIME_ZIP_ENTRIES
    path.chmod(0o755)
    return Runtime(path=path, data=path.read_bytes(), entry_names=names)


def _make_model(tmp_path: Path, size: int = 300_000) -> tuple[Path, bytes]:
    # `@` in the directory: the path must not matter, only the entry name we choose.
    folder = tmp_path / "models@v1"
    folder.mkdir(exist_ok=True)
    path = folder / "tiny.gguf"
    data = b"GGUF" + _random_bytes(size - 4, seed=2)
    path.write_bytes(data)
    return path, data


def _build(
    runtime: Runtime, tmp_path: Path, out_name: str = "tiny.llamafile", **kwargs: Any
) -> Built:
    model, model_data = _make_model(tmp_path)
    out = tmp_path / out_name
    result = write_llamafile(runtime.path, model, out, args=EXTRA_ARGS, **kwargs)
    return Built(runtime, model, model_data, out, result)


@pytest.fixture(params=["random", "zip"])
def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> Runtime:
    return _make_runtime(tmp_path, request.param)


@pytest.fixture
def zip_runtime(tmp_path: Path) -> Runtime:
    return _make_runtime(tmp_path, "zip")


@pytest.fixture
def built(runtime: Runtime, tmp_path: Path) -> Built:
    return _build(runtime, tmp_path)


def _new_infos(built: Built) -> list[zipfile.ZipInfo]:
    infos = zipfile.ZipFile(built.out).infolist()
    return [info for info in infos if info.filename in ("tiny.gguf", ".args")]


def _raw_data_offset(data: bytes, header_offset: int) -> int:
    """Data offset from the local header's own bytes, independent of the code under test."""
    assert data[header_offset : header_offset + 4] == b"PK\x03\x04"
    name_len, extra_len = struct.unpack_from("<2H", data, header_offset + 26)
    return int(header_offset + 30 + name_len + extra_len)


# --- invariant 1: the runtime is untouched, the mode is kept ------------------------------


def test_output_starts_with_the_runtime_bytes(built: Built) -> None:
    assert built.data[: len(built.runtime.data)] == built.runtime.data


@pytest.mark.parametrize(("runtime_mode", "expected"), [(0o775, 0o775), (0o700, 0o755)])
def test_output_keeps_the_runtime_mode_bits_and_is_executable(
    runtime: Runtime, tmp_path: Path, runtime_mode: int, expected: int
) -> None:
    runtime.path.chmod(runtime_mode)
    built = _build(runtime, tmp_path)
    assert stat.S_IMODE(built.out.stat().st_mode) == expected


# --- invariant 2: standard zip readers accept it -------------------------------------------


def test_python_zipfile_testzip_passes(built: Built) -> None:
    assert zipfile.ZipFile(built.out).testzip() is None


def test_unzip_t_passes(built: Built) -> None:
    unzip = shutil.which("unzip")
    if unzip is None:
        pytest.skip("Info-ZIP `unzip` is not installed (apt-get install unzip)")
    completed = subprocess.run(
        [unzip, "-t", str(built.out)], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "No errors detected" in completed.stdout


# --- invariant 3: entry order ---------------------------------------------------------------


def test_entries_are_the_runtime_entries_then_the_new_ones(built: Built) -> None:
    kept = [name for name in built.runtime.entry_names if name != ".args"]
    names = [info.filename for info in zipfile.ZipFile(built.out).infolist()]
    assert names == [*kept, "tiny.gguf", ".args"]


def test_runtime_entries_stay_at_their_offsets_unchanged(
    zip_runtime: Runtime, tmp_path: Path
) -> None:
    built = _build(zip_runtime, tmp_path)
    before = {i.filename: i for i in zipfile.ZipFile(io.BytesIO(zip_runtime.data)).infolist()}
    after = zipfile.ZipFile(built.out)
    for name in ("README.txt", "lib/kernels.cl"):
        info = after.getinfo(name)
        assert info.header_offset == before[name].header_offset
        assert info.compress_type == before[name].compress_type
        assert after.read(name) == zipfile.ZipFile(zip_runtime.path).read(name)


def test_runtime_args_entry_is_replaced_not_duplicated(
    zip_runtime: Runtime, tmp_path: Path
) -> None:
    built = _build(zip_runtime, tmp_path)
    archive = zipfile.ZipFile(built.out)
    assert [i.filename for i in archive.infolist()].count(".args") == 1
    assert b"--old-default" not in archive.read(".args")


def test_two_inputs_with_one_name_are_an_error(runtime: Runtime, tmp_path: Path) -> None:
    with pytest.raises(PackagingError, match=r"two inputs named 'x\.gguf'"):
        append_aligned(runtime.path, [("x.gguf", b"GGUF1"), ("x.gguf", b"GGUF2")], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_runtime_already_holding_a_model_is_rejected(tmp_path: Path) -> None:
    runtime = _make_runtime(tmp_path, "random")
    with zipfile.ZipFile(runtime.path, "a") as archive:
        archive.writestr("other.gguf", b"GGUF old")
    with pytest.raises(PackagingError, match=r"already holds a model entry: other\.gguf"):
        _build(runtime, tmp_path)


def test_runtime_zip_with_relative_offsets_is_rejected(tmp_path: Path) -> None:
    # `cat stub archive.zip` keeps offsets relative to the zip, which the runtime misreads.
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "a")
    runtime = tmp_path / "runtime.com"
    runtime.write_bytes(_random_bytes(1000, seed=3) + archive.getvalue())
    model, _ = _make_model(tmp_path)
    with pytest.raises(PackagingError, match="zip -A"):
        write_llamafile(runtime, model, tmp_path / "out")


# --- invariant 4: each new entry is stored, aligned, exact, with the right CRC -------------


def test_new_entries_are_stored(built: Built) -> None:
    assert [info.compress_type for info in _new_infos(built)] == [zipfile.ZIP_STORED] * 2


def test_new_entries_data_offsets_are_multiples_of_the_alignment(built: Built) -> None:
    data = built.data
    for info in _new_infos(built):
        assert _raw_data_offset(data, info.header_offset) % 65536 == 0


def test_raw_bytes_at_the_model_data_offset_equal_the_model(built: Built) -> None:
    data = built.data
    info = zipfile.ZipFile(built.out).getinfo("tiny.gguf")
    start = _raw_data_offset(data, info.header_offset)
    assert data[start : start + len(built.model_data)] == built.model_data
    assert built.result.model_entry.data_offset == start


def test_crc_matches_in_local_header_and_directory(built: Built) -> None:
    info = zipfile.ZipFile(built.out).getinfo("tiny.gguf")
    expected = zlib.crc32(built.model_data)
    assert info.CRC == expected
    (local_crc,) = struct.unpack_from("<L", built.data, info.header_offset + 14)
    assert local_crc == expected


def test_alignment_4096_works(runtime: Runtime, tmp_path: Path) -> None:
    built = _build(runtime, tmp_path, alignment=4096)
    data = built.data
    offsets = [_raw_data_offset(data, info.header_offset) for info in _new_infos(built)]
    assert all(offset % 4096 == 0 for offset in offsets)
    assert zipfile.ZipFile(built.out).testzip() is None


@pytest.mark.parametrize("alignment", [0, 3, 65535, -4096])
def test_alignment_must_be_a_power_of_two(runtime: Runtime, tmp_path: Path, alignment: int) -> None:
    with pytest.raises(PackagingError, match="power of two"):
        _build(runtime, tmp_path, alignment=alignment)


def test_writer_does_not_parse_the_model(runtime: Runtime, tmp_path: Path) -> None:
    model = tmp_path / "opaque.gguf"
    model.write_bytes(b"not a gguf at all")
    write_llamafile(runtime.path, model, tmp_path / "out")
    assert zipfile.ZipFile(tmp_path / "out").read("opaque.gguf") == b"not a gguf at all"


# --- invariant 5: zero gaps and the 98-byte trailer ----------------------------------------


def test_every_gap_is_zero_bytes(built: Built) -> None:
    data = built.data
    covered = [(0, len(built.runtime.data))]
    for info in _new_infos(built):
        data_end = _raw_data_offset(data, info.header_offset) + info.file_size
        covered.append((info.header_offset, data_end))
    (cd_offset,) = struct.unpack_from("<Q", data, len(data) - 98 + 48)
    covered.append((cd_offset, len(data)))
    covered.sort()
    for (_, gap_start), (gap_end, _) in itertools.pairwise(covered):
        assert gap_start <= gap_end
        assert data[gap_start:gap_end] == bytes(gap_end - gap_start)


def test_last_98_bytes_are_eocd64_locator_eocd_with_consistent_offsets(built: Built) -> None:
    data = built.data
    trailer = data[-98:]
    eocd64_at = len(data) - 98
    (sig, record_size, made_by, needed, disk, cd_disk, on_disk, total, cd_size, cd_offset) = (
        struct.unpack("<4sQ2H2L4Q", trailer[:56])
    )
    assert sig == b"PK\x06\x06"
    assert (record_size, made_by, needed, disk, cd_disk) == (44, 0x032D, 45, 0, 0)
    count = len(zipfile.ZipFile(built.out).infolist())
    assert on_disk == total == count
    assert cd_offset + cd_size == eocd64_at
    assert data[cd_offset : cd_offset + 4] == b"PK\x01\x02"
    assert data[cd_offset:eocd64_at].count(b"PK\x01\x02") >= count

    sig, locator_disk, locator_offset, disks = struct.unpack("<4sLQL", trailer[56:76])
    assert (sig, locator_disk, locator_offset, disks) == (b"PK\x06\x07", 0, eocd64_at, 1)

    sig, disk, cd_disk, on_disk, total, size32, offset32, comment = struct.unpack(
        "<4s4H2LH", trailer[76:]
    )
    assert (sig, disk, cd_disk, on_disk, total) == (b"PK\x05\x06", 0, 0, count, count)
    assert (size32, offset32, comment) == (cd_size, 0xFFFFFFFF, 0)


# --- invariant 6: .args round-trips, one model ---------------------------------------------


def test_args_round_trip_to_the_intended_argv(built: Built) -> None:
    text = zipfile.ZipFile(built.out).read(".args").decode()
    assert text == "-m\n/zip/tiny.gguf\n--ctx-size\n512\n-ngl\n0\n...\n"
    assert built.result.args == ("-m", "/zip/tiny.gguf", *EXTRA_ARGS)


def test_exactly_one_gguf_entry(built: Built) -> None:
    names = [info.filename for info in zipfile.ZipFile(built.out).infolist()]
    assert [name for name in names if name.endswith(".gguf")] == ["tiny.gguf"]
    assert built.result.model_entry.name == "tiny.gguf"


def test_runtime_09_names_the_model_without_zip_prefix(runtime: Runtime, tmp_path: Path) -> None:
    assert build_args("m.gguf", ["-c", "8"], runtime_version="0.9.3") == "-m\nm.gguf\n-c\n8\n...\n"
    assert build_args("m.gguf", runtime_version="0.10.6") == "-m\n/zip/m.gguf\n...\n"
    built = _build(runtime, tmp_path, runtime_version="0.9.8")
    assert zipfile.ZipFile(built.out).read(".args").startswith(b"-m\ntiny.gguf\n")


def test_runtime_version_must_be_a_version() -> None:
    with pytest.raises(PackagingError, match="runtime version"):
        build_args("m.gguf", runtime_version="latest")


@pytest.mark.parametrize(
    "token",
    ["two words", "tab\there", "new\nline", "it's", 'say"hi"', "$HOME", "back\\slash", "#x", "..."],
)
def test_unsafe_args_tokens_are_rejected_by_name(token: str) -> None:
    with pytest.raises(PackagingError) as caught:
        build_args("m.gguf", ["--ok", token])
    assert repr(token) in str(caught.value)


def test_empty_args_token_is_rejected() -> None:
    with pytest.raises(PackagingError, match="empty argument"):
        build_args("m.gguf", [""])


def test_unsafe_token_leaves_no_output(runtime: Runtime, tmp_path: Path) -> None:
    model, _ = _make_model(tmp_path)
    with pytest.raises(PackagingError, match="'a b'"):
        write_llamafile(runtime.path, model, tmp_path / "out", args=["a b"])
    assert not (tmp_path / "out").exists()


# --- invariant 7: the Windows 4 GiB warning ------------------------------------------------


def test_windows_warning_decision_by_size() -> None:
    assert WINDOWS_MAX_SIZE == 4 * 1024**3
    assert windows_warnings(WINDOWS_MAX_SIZE - 1, "m.exe") == ()
    (warning,) = windows_warnings(WINDOWS_MAX_SIZE, "m.exe")
    assert "4 GiB" in warning
    assert len(windows_warnings(5 * 1024**3, "m.exe")) == 1


def test_windows_warning_names_a_missing_exe_suffix() -> None:
    (warning,) = windows_warnings(1000, "m.llamafile")
    assert ".exe" in warning


def test_windows_warnings_only_when_asked(runtime: Runtime, tmp_path: Path) -> None:
    assert _build(runtime, tmp_path).result.warnings == ()
    exe = _build(runtime, tmp_path, out_name="tiny.exe", windows_target=True)
    assert exe.result.warnings == ()


# --- writing: determinism, atomicity, names ------------------------------------------------


def test_two_writes_give_identical_bytes(runtime: Runtime, tmp_path: Path) -> None:
    first = _build(runtime, tmp_path, out_name="a.llamafile").data
    second = _build(runtime, tmp_path, out_name="b.llamafile").data
    assert first == second


def test_interrupted_write_leaves_no_output(runtime: Runtime, tmp_path: Path) -> None:
    def interrupt(done: int, total: int) -> None:
        if done > len(runtime.data):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build(runtime, tmp_path, progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models@v1", "runtime.com"]


def test_interrupted_rewrite_keeps_the_previous_output(runtime: Runtime, tmp_path: Path) -> None:
    previous = _build(runtime, tmp_path).data

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build(runtime, tmp_path, progress=interrupt)
    assert (tmp_path / "tiny.llamafile").read_bytes() == previous


def test_progress_ends_at_the_total(runtime: Runtime, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    built = _build(runtime, tmp_path, progress=lambda done, total: calls.append((done, total)))
    args_size = zipfile.ZipFile(built.out).getinfo(".args").file_size
    total = len(runtime.data) + len(built.model_data) + args_size
    assert calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_model_name_with_at_is_rejected_unless_renamed(runtime: Runtime, tmp_path: Path) -> None:
    model = tmp_path / "tiny@q4.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(PackagingError, match="'@'"):
        write_llamafile(runtime.path, model, tmp_path / "out")
    result = write_llamafile(runtime.path, model, tmp_path / "out", entry_name="tiny-q4.gguf")
    assert result.model_entry.name == "tiny-q4.gguf"


def test_output_may_not_overwrite_an_input(runtime: Runtime, tmp_path: Path) -> None:
    model, data = _make_model(tmp_path)
    with pytest.raises(PackagingError, match="overwrite"):
        write_llamafile(runtime.path, model, model)
    assert model.read_bytes() == data


def test_a_missing_model_is_a_packaging_error(runtime: Runtime, tmp_path: Path) -> None:
    with pytest.raises(PackagingError, match="cannot read input"):
        write_llamafile(runtime.path, tmp_path / "absent.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_llamafile_can_be_the_runtime_of_another(built: Built, tmp_path: Path) -> None:
    # Its ZIP64 directory is read back, and the same-named model entry is replaced.
    again = write_llamafile(built.out, built.model, tmp_path / "again", args=EXTRA_ARGS)
    archive = zipfile.ZipFile(tmp_path / "again")
    assert archive.testzip() is None
    assert [i.filename for i in archive.infolist()].count("tiny.gguf") == 1
    assert again.model_entry.header_offset > len(built.data)
    assert os.path.getsize(tmp_path / "again") == again.size


def test_holes_in_a_sparse_model_stay_holes(tmp_path: Path) -> None:
    # Data islands at the start, in the middle (not on a block boundary) and at the end, with
    # holes of several MiB between: the entry reads back byte for byte, CRC included, and the
    # output takes about the islands' disk space, not the model's size.
    model = tmp_path / "sparse.gguf"
    islands = {0: b"GGUF" + _random_bytes(5000, 1), 9_000_001: _random_bytes(70_000, 2),
               40 * 1024**2 - 3: b"end"}
    with model.open("wb") as f:
        for offset, data in islands.items():
            f.seek(offset)
            f.write(data)
    runtime = tmp_path / "runtime"
    runtime.write_bytes(b"MZqFpD='\n" + _random_bytes(1000, 3))
    out = tmp_path / "out.llamafile"
    write_llamafile(runtime, model, out)
    expected = model.read_bytes()
    with zipfile.ZipFile(out) as archive:
        assert archive.testzip() is None
        assert archive.read("sparse.gguf") == expected
    if model.stat().st_blocks * 512 < 1024**2:  # the file system keeps holes
        assert out.stat().st_blocks * 512 < 2 * 1024**2
