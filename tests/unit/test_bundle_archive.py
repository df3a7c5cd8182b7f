"""The reproducible tar.gz: the same tree gives the same bytes whatever its mtimes, owners and
creation order; entries sorted, owners 0, fixed mtime, normalised modes, links kept."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tarfile
from pathlib import Path

import pytest

from launcher.errors import PackagingError
from launcher.packaging.formats.archive import DEFAULT_MTIME, walk_sorted, write_tar_gz


def make_tree(root: Path, order: list[str], mtime: int) -> Path:
    files = {
        "start": (b"#!/bin/sh\necho hi\n", 0o700),
        "lalo.yaml": (b"models: {}\n", 0o600),
        "models/b.gguf": (b"GGUF" + bytes(range(256)) * 40, 0o640),
        "models/a.gguf": (b"GGUF" + b"\x01" * 5000, 0o666),
        "bin/libggml.so.0.9": (b"\x7fELF lib", 0o755),
        "LICENSES/llama.cpp/LICENSE": (b"MIT\n", 0o644),
    }
    for name in order:
        data, mode = files[name]
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        os.utime(path, (mtime, mtime))
    (root / "bin" / "libggml.so.0").symlink_to("libggml.so.0.9")
    (root / "empty").mkdir()
    return root


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_archives_of_the_same_content_are_byte_identical(tmp_path: Path) -> None:
    names = ["start", "lalo.yaml", "models/b.gguf", "models/a.gguf", "bin/libggml.so.0.9",
             "LICENSES/llama.cpp/LICENSE"]
    one = make_tree(tmp_path / "one" / "bundle", names, 1_700_000_000)
    two = make_tree(tmp_path / "two" / "bundle", list(reversed(names)), 1_800_000_000)
    a = write_tar_gz(one, tmp_path / "a.tar.gz")
    b = write_tar_gz(two, tmp_path / "b.tar.gz")
    assert digest(a) == digest(b)


def test_entries_are_sorted_with_fixed_metadata(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "bundle", ["models/b.gguf", "start", "models/a.gguf",
                                           "lalo.yaml", "bin/libggml.so.0.9",
                                           "LICENSES/llama.cpp/LICENSE"], 1_750_000_000)
    out = write_tar_gz(tree, tmp_path / "bundle.tar.gz")
    with tarfile.open(out) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names[0] == "bundle"
        assert names == ["bundle", *sorted(names[1:])]
        for member in members:
            assert member.mtime == DEFAULT_MTIME
            assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
        modes = {m.name: m.mode for m in members}
        assert modes["bundle/start"] == 0o755  # executables stay executable
        assert modes["bundle/lalo.yaml"] == 0o644
        assert modes["bundle/models"] == 0o755
        link = tar.getmember("bundle/bin/libggml.so.0")
        assert link.issym() and link.linkname == "libggml.so.0.9"
        assert tar.getmember("bundle/empty").isdir()
        extracted = tar.extractfile("bundle/models/b.gguf")
        assert extracted is not None
        assert extracted.read() == (tree / "models" / "b.gguf").read_bytes()
    raw = out.read_bytes()
    # gzip header: no file name (FLG bit 3 clear) and the fixed mtime
    assert raw[3] & 0x08 == 0
    assert struct.unpack("<I", raw[4:8])[0] == DEFAULT_MTIME
    assert gzip.decompress(raw)  # a valid stream


def test_source_date_epoch_sets_the_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_text("x")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234567890")
    out = write_tar_gz(tree, tmp_path / "t.tar.gz")
    with tarfile.open(out) as tar:
        assert {m.mtime for m in tar.getmembers()} == {1234567890}


def test_prefix_and_progress(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_bytes(b"x" * 1000)
    seen: list[tuple[int, int]] = []
    out = write_tar_gz(tree, tmp_path / "t.tar.gz", prefix="other",
                       progress=lambda done, total: seen.append((done, total)))
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["other", "other/f"]
    assert seen == [(1000, 1000)]


def test_links_out_of_the_tree_are_refused_and_nothing_is_left(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "escape").symlink_to("/etc/passwd")
    with pytest.raises(PackagingError, match="links outside the tree"):
        write_tar_gz(tree, tmp_path / "t.tar.gz")
    assert not list(tmp_path.glob("*.tar.gz*"))
    (tree / "escape").unlink()
    (tree / "up").symlink_to("../x")
    with pytest.raises(PackagingError, match="links outside the tree"):
        write_tar_gz(tree, tmp_path / "t.tar.gz")


def test_walk_sorted_uses_slash_order(tmp_path: Path) -> None:
    for name in ("a-b", "a/c", "a.b", "B"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    rel = [p.relative_to(tmp_path).as_posix() for p in walk_sorted(tmp_path)]
    assert rel == sorted(rel) == ["B", "a", "a-b", "a.b", "a/c"]
