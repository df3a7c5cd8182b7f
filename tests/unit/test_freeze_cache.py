"""The cache of frozen lalo apps keeps the most recently used few and nothing in progress."""

from __future__ import annotations

import os
from pathlib import Path

from launcher.packaging.freeze import prune_apps


def _app(folder: Path, name: str, mtime: int) -> Path:
    path = folder / name
    (path / "lalo").mkdir(parents=True)
    (path / "lalo" / "lalo").write_bytes(b"frozen")
    os.utime(path, (mtime, mtime))
    return path


def test_the_least_recently_used_apps_go(tmp_path: Path) -> None:
    old = _app(tmp_path, "app-0000000000000001", 1_000)
    older = _app(tmp_path, "app-0000000000000002", 500)
    recent = _app(tmp_path, "app-0000000000000003", 3_000)
    used = _app(tmp_path, "app-0000000000000004", 2_000)
    staging = _app(tmp_path, ".app-0000000000000005-123", 10)  # a build in progress
    work = tmp_path / "work"
    work.mkdir()

    removed = prune_apps(tmp_path, keep=2)

    assert sorted(removed) == sorted([old, older])
    assert not old.exists() and not older.exists()
    assert recent.is_dir() and used.is_dir() and staging.is_dir() and work.is_dir()


def test_nothing_goes_while_within_the_limit(tmp_path: Path) -> None:
    apps = [_app(tmp_path, f"app-{i:016d}", 100 * i) for i in range(3)]
    assert prune_apps(tmp_path, keep=3) == []
    assert all(a.is_dir() for a in apps)
    assert prune_apps(tmp_path / "missing", keep=3) == []
