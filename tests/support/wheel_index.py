"""A package index on this machine for tests of models carried in wheels: tiny wheels made
here, served by a real HTTP "simple" index (PEP 503 layout, directory listings as link pages),
and a pip environment that uses only that index, so the real pip does the fetching."""

from __future__ import annotations

import base64
import hashlib
import http.server
import os
import re
import socket
import threading
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def make_wheel(directory: Path, name: str, version: str, members: Mapping[str, bytes]) -> Path:
    """A valid pure-Python wheel `name-version-py3-none-any.whl` holding `members`."""
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    files: dict[str, bytes] = dict(members)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: lalo-tests\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n")
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


class WheelIndex:
    """`<root>/simple/<project>/<wheel>` served over HTTP; `url` is the simple index URL."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "simple").mkdir(parents=True, exist_ok=True)
        self.url = ""
        self.requests: list[str] = []  # request lines served, in order

    def publish(self, name: str, version: str, members: Mapping[str, bytes]) -> Path:
        return make_wheel(self.root / "simple" / normalize(name), name, version, members)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _CuttingHandler(_QuietHandler):
    """Serves wheels with Range support (as PyPI's CDN does) and, once per wheel, cuts the
    transfer halfway: the headers promise the whole body, half is sent, the socket is shut."""

    cut_done: set[str]  # wheels already cut once (a class per server)
    cut_always: bool  # every transfer breaks off, resumed ones too
    served: list[str]  # "PATH RANGE" of every wheel request, in order

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not (self.path.endswith(".whl") and path.is_file()):
            super().do_GET()
            return
        data = path.read_bytes()
        start = 0
        wanted = self.headers.get("Range", "")
        self.served.append(f"{self.path} {wanted or '-'}")
        if wanted.startswith("bytes=") and wanted[6:].split("-")[0].isdigit():
            start = min(int(wanted[6:].split("-")[0]), len(data))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if self.cut_always or self.path not in self.cut_done:
            self.cut_done.add(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@contextmanager
def serve_index(root: Path, *, cut_once: bool = False,
                cut_always: bool = False) -> Iterator[WheelIndex]:
    """The index at `root`; `cut_once`: the first transfer of each wheel breaks off halfway,
    `cut_always`: every one does (`index.requests` lists the wheel requests and their Range
    headers)."""
    index = WheelIndex(root)
    kind: type[_QuietHandler] = _QuietHandler
    if cut_once or cut_always:
        kind = type("Cutting", (_CuttingHandler,), {"cut_done": set(), "served": index.requests,
                                                     "cut_always": cut_always})

    def handler(*args: object, **kwargs: object) -> _QuietHandler:
        return kind(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    index.url = f"http://127.0.0.1:{server.server_address[1]}/simple/"
    try:
        yield index
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def use_only_index(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Make pip (run by the code under test, as a user would have it configured) see only `url`."""
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no user or site pip.conf
    monkeypatch.setenv("PIP_INDEX_URL", url)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
