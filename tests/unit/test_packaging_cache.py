"""The packaging cache: the frozen lalo apps kept (the most recently used few, nothing in
progress), and one `lalo build` at a time using it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from launcher.packaging.files import DigestCache
from launcher.packaging.frozen.freeze import prune_apps


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


def test_a_second_build_waits_for_the_first_and_says_so(tmp_path: Path) -> None:
    import threading

    from launcher.packaging.lock import packaging_lock

    said: list[str] = []
    order: list[str] = []
    first_in = threading.Event()
    release = threading.Event()

    def first() -> None:
        with packaging_lock(tmp_path, said.append):
            order.append("first in")
            first_in.set()
            release.wait(10)
            order.append("first out")

    def second() -> None:
        with packaging_lock(tmp_path, said.append):
            order.append("second in")

    one = threading.Thread(target=first)
    one.start()
    assert first_in.wait(10)
    two = threading.Thread(target=second)
    two.start()
    two.join(0.3)
    assert two.is_alive() and order == ["first in"]  # blocked while the first holds it
    release.set()
    one.join(10)
    two.join(10)
    assert order == ["first in", "first out", "second in"]
    assert said == [f"waiting for another `lalo build` using {tmp_path} to finish"]


def test_the_digest_cache_sees_a_file_written_again_with_the_same_size_and_mtime(
        tmp_path: Path) -> None:
    # an archive rebuilt at the same path within one timestamp tick: same path, size and mtime
    cache = DigestCache(tmp_path / "digests.json")
    path = tmp_path / "bundle.tar.gz"
    path.write_bytes(b"a" * 64)
    first = cache.sha256(path)
    when = path.stat().st_mtime_ns
    fresh = tmp_path / "bundle.tar.gz.tmp"
    fresh.write_bytes(b"b" * 64)
    os.utime(fresh, ns=(when, when))
    fresh.replace(path)  # how the archive is written: a rename into place
    assert path.stat().st_mtime_ns == when and path.stat().st_size == 64
    assert cache.sha256(path) != first
    assert cache.sha256(path) == hashlib.sha256(b"b" * 64).hexdigest()


def test_what_a_killed_build_left_is_removed_and_a_running_builds_is_not(tmp_path: Path) -> None:
    import subprocess
    import sys

    from launcher.packaging.atomic import atomic_output, remove_stale

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(gone.stdout)  # a pid whose process has exited
    left = [f".tiny-bundle.staging-{dead}", f".tiny-bundle.old-{dead}", f".tiny.exe-staging-{dead}",
            f".app-0123abcd-{dead}"]
    for name in left:
        (tmp_path / name).mkdir()
        (tmp_path / name / "half").write_bytes(b"x")
    (tmp_path / f".tiny-bundle.tar.gz.{dead}.k2j4_x9a.tmp").write_bytes(b"half an archive")
    running = [f".tiny-bundle.staging-{os.getpid()}", "tiny-bundle", "tiny-bundle.tar.gz",
               ".hidden-but-not-ours"]
    for name in running:
        (tmp_path / name).mkdir()
    removed = sorted(p.name for p in remove_stale(tmp_path))
    assert removed == sorted([*left, f".tiny-bundle.tar.gz.{dead}.k2j4_x9a.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(running)
    # atomic_output's temporary file carries its pid: a kill -9 leaves one remove_stale knows
    try:
        with atomic_output(tmp_path / "x.tar.gz", 0o644) as out:
            out.write(b"partial")
            (temp,) = tmp_path.glob(".x.tar.gz.*.tmp")
            assert temp.name.startswith(f".x.tar.gz.{os.getpid()}.")
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert not list(tmp_path.glob(".x.tar.gz.*"))


def test_the_frozen_apps_key_follows_the_metadata_it_ships(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    # lalo's own METADATA carries the README: an app frozen before a README-only change was
    # reused by the next build while a fresh freeze shipped the new text (CI's failure)
    from importlib import metadata

    from launcher.packaging.frozen import freeze

    class Dist:
        def __init__(self, readme: str) -> None:
            self.metadata = {"Name": "lalo-launcher"}
            self.version = "0.1.0"
            self.readme = readme

        def read_text(self, name: str) -> str | None:
            return f"Name: lalo-launcher\n\n{self.readme}" if name == "METADATA" else None

    for name in (freeze.SPEC_FILE, freeze.ENTRY_SCRIPT):
        (tmp_path / name).write_text("recipe")
    keys = []
    for readme in ("one alone 0.92x", "one alone 0.92-0.93x", "one alone 0.92x"):
        monkeypatch.setattr(metadata, "distributions", lambda r=readme, **_: [Dist(r)])
        keys.append(freeze.app_key(tmp_path))
    assert keys[0] != keys[1] and keys[0] == keys[2]


def test_the_frozen_apps_key_ignores_metadata_that_is_not_shipped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # pytest puts the checkout on sys.path, and `pip install -e` left lalo_launcher.egg-info in
    # it: the key differed from that of a freeze started elsewhere, which then froze again
    from launcher.packaging.frozen import freeze

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for name in (freeze.SPEC_FILE, freeze.ENTRY_SCRIPT):
        (recipes / name).write_text("recipe")
    checkout = tmp_path / "checkout"
    (checkout / "lalo_launcher.egg-info").mkdir(parents=True)
    (checkout / "lalo_launcher.egg-info" / "PKG-INFO").write_text(
        "Metadata-Version: 2.1\nName: lalo-launcher\nVersion: 0.0.1\n\nan old README\n")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    before = freeze.app_key(recipes)
    monkeypatch.syspath_prepend(str(checkout))
    assert freeze.app_key(recipes) == before
    monkeypatch.setenv("PYTHONPATH", str(checkout))  # on PyInstaller's path too: shipped
    assert freeze.app_key(recipes) != before
