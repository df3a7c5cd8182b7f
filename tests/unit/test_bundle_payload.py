"""The single binary's appended payload: written after an executable stand-in, read back from
its end, extracted once into the cache (checked file by file), older payloads removed."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from launcher.errors import PackagingError
from launcher.packaging.formats.payload import (
    COMPLETE,
    PayloadFile,
    append_payload,
    extracted,
    read_payload,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, bytes]:
    rng = random.Random(3)
    files = {
        "exe": b"\x7fELF" + rng.randbytes(50_000),
        "server": b"\x7fELF server " * 5000,  # compressible: stored deflated
        "model": b"GGUF" + rng.randbytes(200_001),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return files


def payload_files(tmp_path: Path, inputs: dict[str, bytes]) -> list[PayloadFile]:
    return [
        PayloadFile("engine/bin/llama-server", tmp_path / "server", sha(inputs["server"]), 0o755,
                    compress=True),
        PayloadFile("engine/bin/libggml.so.0", link="libggml.so.0.1"),
        PayloadFile("models/m.gguf", tmp_path / "model", sha(inputs["model"]), 0o644),
    ]


def test_round_trip(tmp_path: Path, inputs: dict[str, bytes]) -> None:
    out = tmp_path / "lalo-ai"
    written = append_payload(tmp_path / "exe", out, "lalo-ai", payload_files(tmp_path, inputs))
    data = out.read_bytes()
    assert data.startswith(inputs["exe"])  # the executable is untouched, first
    assert os.access(out, os.X_OK)
    assert len(data) < len(inputs["exe"]) + len(inputs["server"]) + len(inputs["model"])
    payload = read_payload(out)
    assert payload is not None and payload.key == written.key and payload.name == "lalo-ai"
    assert payload.has("engine/") and payload.has("models/") and not payload.has("other/")
    folder = extracted(out, payload, tmp_path / "cache")
    assert folder.name == f"lalo-ai-{payload.key[:16]}"
    assert (folder / "engine" / "bin" / "llama-server").read_bytes() == inputs["server"]
    assert os.access(folder / "engine" / "bin" / "llama-server", os.X_OK)
    assert os.readlink(folder / "engine" / "bin" / "libggml.so.0") == "libggml.so.0.1"
    assert (folder / "models" / "m.gguf").read_bytes() == inputs["model"]
    assert (folder / COMPLETE).is_file()


def test_second_start_reuses_the_extracted_files(tmp_path: Path, inputs: dict[str, bytes]) -> None:
    out = tmp_path / "lalo-ai"
    append_payload(tmp_path / "exe", out, "lalo-ai", payload_files(tmp_path, inputs))
    payload = read_payload(out)
    assert payload is not None
    folder = extracted(out, payload, tmp_path / "cache")
    marker = (folder / "models" / "m.gguf").stat().st_mtime_ns
    out.write_bytes(b"")  # a reuse must not read the executable again
    assert extracted(out, payload, tmp_path / "cache") == folder
    assert (folder / "models" / "m.gguf").stat().st_mtime_ns == marker


def test_a_new_payload_replaces_the_old_one(tmp_path: Path, inputs: dict[str, bytes]) -> None:
    out = tmp_path / "lalo-ai"
    append_payload(tmp_path / "exe", out, "lalo-ai", payload_files(tmp_path, inputs))
    first = read_payload(out)
    assert first is not None
    old = extracted(out, first, tmp_path / "cache")
    (tmp_path / "model").write_bytes(b"GGUF v2")
    files = payload_files(tmp_path, inputs)
    files[2] = PayloadFile("models/m.gguf", tmp_path / "model", sha(b"GGUF v2"), 0o644)
    append_payload(tmp_path / "exe", out, "lalo-ai", files)
    second = read_payload(out)
    assert second is not None and second.key != first.key
    new = extracted(out, second, tmp_path / "cache")
    assert (new / "models" / "m.gguf").read_bytes() == b"GGUF v2"
    assert not old.exists()


def test_a_corrupt_payload_is_refused_and_leaves_nothing(tmp_path: Path,
                                                         inputs: dict[str, bytes]) -> None:
    out = tmp_path / "lalo-ai"
    files = payload_files(tmp_path, inputs)
    files[2] = PayloadFile("models/m.gguf", tmp_path / "model", "0" * 64, 0o644)
    append_payload(tmp_path / "exe", out, "lalo-ai", files)
    payload = read_payload(out)
    assert payload is not None
    with pytest.raises(PackagingError, match=r"models/m\.gguf does not match its size or sha256"):
        extracted(out, payload, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_no_payload(tmp_path: Path, inputs: dict[str, bytes]) -> None:
    assert read_payload(tmp_path / "exe") is None
    assert read_payload(tmp_path / "missing") is None
