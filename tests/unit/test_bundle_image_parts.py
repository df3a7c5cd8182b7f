"""The image target's parts that need no container tools: the frozen lalo's `--probe` (health
check and liveness) against a real local HTTP server, `--seed-models` onto a volume, the
reproducible OCI layout archive, and the libraries `ldd` lists for the image."""

from __future__ import annotations

import http.server
import json
import os
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import pytest

from launcher.packaging.formats.archive import write_tar
from launcher.packaging.frozen.entry import probe
from launcher.packaging.frozen.seed import RECORD, seed_models
from launcher.packaging.targets.image_layout import system_libraries, write_system_root
from launcher.supervisor import platform
from launcher.supervisor.instance import STATE_FILE, InstanceInfo

TOKEN = "admin-token-xyz"


class _Handler(http.server.BaseHTTPRequestHandler):
    answers: ClassVar[dict[str, int]] = {}  # path -> status; set per test

    def do_GET(self) -> None:
        authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
        status = self.answers.get(self.path, 404) if authorized else 401
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Handler]]:
    """A real HTTP server standing in for a running lalo, published in a state folder as lalo
    publishes itself (this test process is the 'instance')."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state = tmp_path / "state"
    state.mkdir()
    me = os.getpid()
    info = InstanceInfo(pid=me, created=platform.create_time(me) or 0.0,
                        url=f"http://127.0.0.1:{server.server_address[1]}", started_at=0.0,
                        admin_token=TOKEN, config="test", version="0", log_dir=str(tmp_path))
    (state / STATE_FILE).write_text(json.dumps(asdict(info)))
    monkeypatch.setenv("LALO_STATE_DIR", str(state))
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # must not be used
    _Handler.answers = {}
    yield _Handler
    server.shutdown()
    server.server_close()


def test_probe_passes_on_200_with_the_admin_token(instance: type[_Handler]) -> None:
    instance.answers = {"/health": 200, "/api/status": 200}
    assert probe("/health") == 0
    assert probe("/api/status") == 0


def test_probe_fails_on_other_answers(instance: type[_Handler],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    instance.answers = {"/api/status": 503}
    assert probe("/api/status") == 1
    assert "answered 503" in capsys.readouterr().err
    assert probe("/nowhere") == 1


def test_probe_fails_without_a_running_lalo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LALO_STATE_DIR", str(tmp_path / "empty"))
    assert probe("/health") == 1
    assert "not running" in capsys.readouterr().err


def make_bundle(root: Path, models: dict[str, bytes]) -> Path:
    import hashlib

    (root / "models").mkdir(parents=True)
    entries = []
    for name, data in models.items():
        (root / "models" / name).write_bytes(data)
        entries.append({"name": name.split(".")[0], "file": f"models/{name}", "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    (root / "manifest.json").write_text(json.dumps({"models": entries}))
    return root


def test_seed_copies_once_and_again_when_a_model_changes(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "app", {"a.gguf": b"A" * 100, "b.gguf": b"B" * 50})
    volume = tmp_path / "volume"
    volume.mkdir()
    first = seed_models(bundle, volume)
    assert [line.split(":")[0] for line in first] == ["a.gguf", "b.gguf"]
    assert all("copied" in line for line in first)
    assert (volume / "a.gguf").read_bytes() == b"A" * 100
    assert json.loads((volume / RECORD).read_text()).keys() == {"a.gguf", "b.gguf"}
    assert all("already on" in line for line in seed_models(bundle, volume))
    # a new image with a changed model: only that one is copied
    changed = make_bundle(tmp_path / "app2", {"a.gguf": b"A" * 100, "b.gguf": b"C" * 60})
    again = seed_models(changed, volume)
    assert "already on" in again[0] and "copied" in again[1]
    assert (volume / "b.gguf").read_bytes() == b"C" * 60
    assert not [p for p in volume.iterdir() if p.name.endswith(".seeding")]


def test_seed_from_an_image_without_models_says_what_the_volume_needs(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "app", {"a.gguf": b"A"})
    for path in (bundle / "models").iterdir():
        path.unlink()
    (bundle / "models").rmdir()
    (lines,) = [seed_models(bundle, tmp_path)]
    assert lines == [f"this image holds no models: {tmp_path} must already hold a.gguf"]


def test_oci_layout_archive_is_byte_identical_and_timeless(tmp_path: Path) -> None:
    layout = tmp_path / "oci"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text("{}")
    (layout / "blobs" / "sha256" / "ab").write_bytes(b"x" * 10)
    first = write_tar(layout, tmp_path / "one.tar")
    os.utime(layout / "index.json", (1_000_000, 1_000_000))
    second = write_tar(layout, tmp_path / "two.tar")
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["blobs", "blobs/sha256", "blobs/sha256/ab",
                                         "index.json", "oci-layout"]
    assert {(m.mtime, m.uid, m.gid) for m in members} == {(0, 0, 0)}


def test_system_libraries_are_what_ldd_lists_outside_the_bundle(tmp_path: Path) -> None:
    python = Path(os.path.realpath("/proc/self/exe"))
    libraries = system_libraries([python], inside=tmp_path)
    names = {p.name for p in libraries}
    assert "libc.so.6" in names
    assert any(name.startswith("ld-linux") for name in names)
    assert "libgcc_s.so.1" in names  # dlopened by glibc: added by hand
    root = tmp_path / "root"
    write_system_root(root, libraries)
    for library in libraries:
        assert (root / str(library).lstrip("/")).is_file()
    assert "lalo:x:65532:65532:" in (root / "etc" / "passwd").read_text()
    assert (root / "tmp").stat().st_mode & 0o1777 == 0o1777


def test_a_library_shipped_in_the_bundle_is_not_missing(tmp_path: Path) -> None:
    """A program that loads a library from the bundle (not on ldd's search path) is fine; one
    whose library is nowhere is a PackagingError naming it."""
    import shutil
    import subprocess

    from launcher.errors import PackagingError

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to make a test program")
    app = tmp_path / "app"
    app.mkdir()
    (tmp_path / "foo.c").write_text("int foo(void) { return 1; }\n")
    (tmp_path / "main.c").write_text("int foo(void);\nint main(void) { return foo(); }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(app / "libfoo.so"),
                    str(tmp_path / "foo.c")], check=True)
    subprocess.run([cc, "-o", str(app / "main"), str(tmp_path / "main.c"), f"-L{app}",
                    "-lfoo"], check=True)
    names = {p.name for p in system_libraries([app / "main"], inside=app)}
    assert "libc.so.6" in names and "libfoo.so" not in names
    (app / "libfoo.so").unlink()
    with pytest.raises(PackagingError, match=r"libfoo\.so => not found"):
        system_libraries([app / "main"], inside=app)
