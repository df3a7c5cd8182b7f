"""A small real HTTP server that speaks the Hugging Face hub's file-download protocol.

`HEAD|GET /{owner}/{name}/resolve/{revision}/{path}` answers like huggingface.co: LFS files
get a 302 to a CDN-like URL on another origin (`localhost` instead of `127.0.0.1`) carrying
X-Repo-Commit, X-Linked-Etag (the sha256) and X-Linked-Size; small files answer 200 with a
git-sha1 ETag; unknown repositories, revisions and files get 404 with the hub's X-Error-Code.
`/cdn/{sha256}` serves the bytes with Range support. Modes make it misbehave on purpose:
`cut_once` closes the first transfer halfway, `cut_then_fail` also answers 500 afterwards
(so the client gives up with half a file), `cut_always` closes every transfer halfway,
`corrupt` serves flipped bytes; `cut_next(fractions)` cuts the next transfers at chosen points.
A cut sends the status line, the headers and part of the body, then shuts the socket: what a
dropped connection looks like to the client, not an HTTP error. `rate` (bytes per second)
slows every transfer down, so a test has time to kill the client mid-download.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

Mode = Literal["normal", "cut_once", "cut_then_fail", "cut_always", "corrupt"]
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class RepoFile:
    content: bytes
    lfs: bool = True

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def git_sha1(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()


@dataclass
class Repo:
    commit: str
    files: dict[str, RepoFile]
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit

    def commit_for(self, revision: str) -> str | None:
        if revision == self.commit:
            return self.commit
        return self.branches.get(revision, self.commit if revision == "main" else None)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    host: str
    range: str | None
    authorization: str | None
    status: int
    sent: int  # body bytes written


class HubServer:
    """Serves `repos` on 127.0.0.1; `url` goes in HF_ENDPOINT. Start with `running()`."""

    def __init__(self, repos: dict[str, Repo], mode: Mode = "normal", rate: int | None = None) -> None:
        self.repos = repos
        self.mode: Mode = mode
        self.rate = rate  # body bytes per second of each transfer; None: as fast as it can
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._cut_done = False
        self._cut_plan: list[float] = []
        self._server: _Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn(self) -> str:
        # Another origin than `url`, as the real CDN is: the client must not forward the token.
        return f"http://localhost:{self.port}"

    def set_mode(self, mode: Mode) -> None:
        with self._lock:
            self.mode = mode
            self._cut_done = False
            self._cut_plan = []

    def cut_next(self, fractions: Sequence[float]) -> None:
        """Cut the next transfers, one per fraction, after that fraction of each one's body."""
        with self._lock:
            self._cut_plan = list(fractions)

    def cdn_gets(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path.startswith("/cdn/")]

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def take_cut(self, length: int) -> int | None:
        """How many of this transfer's `length` body bytes to send before cutting it, or None
        to send them all."""
        with self._lock:
            if self._cut_plan:
                return int(length * self._cut_plan.pop(0))
            if self.mode == "cut_always" or (
                self.mode in ("cut_once", "cut_then_fail") and not self._cut_done
            ):
                self._cut_done = True
                return length // 2
            return None

    def blob(self, sha: str) -> RepoFile | None:
        for repo in self.repos.values():
            for file in repo.files.values():
                if file.sha256 == sha:
                    return file
        return None

    @contextmanager
    def running(self) -> Iterator[HubServer]:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        try:
            yield self
        finally:
            self.stop()
            thread.join(timeout=10)

    def stop(self) -> None:
        """Stop listening and drop open keep-alive connections: the hub is gone."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.drop_connections()
            self._server = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self._open_lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._open.clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: HubServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, *, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        sent, status = 0, 500
        try:
            if (match := _RESOLVE.match(path)) is not None:
                status, sent = self._resolve(match["repo"], match["revision"], match["path"], head)
            elif (match := _CDN.match(path)) is not None:
                status, sent = self._cdn(match["sha"], head)
            else:
                status = self._error(404, "NotFound", "no such route", head)
        finally:
            self.server_hub.record(
                Request(
                    method="HEAD" if head else "GET",
                    path=path,
                    host=self.headers.get("Host", ""),
                    range=self.headers.get("Range"),
                    authorization=self.headers.get("Authorization"),
                    status=status,
                    sent=sent,
                )
            )

    def _error(self, status: int, code: str, message: str, head: bool, commit: str | None = None) -> int:
        body = f'{{"error":"{message}"}}'.encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        return status

    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> tuple[int, int]:
        repo = self.server_hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found", head), 0
        commit = repo.commit_for(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, head), 0
        file = repo.files.get(filename)
        if file is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", head, commit), 0
        if file.lfs:
            body = b"Found. Redirecting"
            self.send_response(302)
            self.send_header("Location", f"{self.server_hub.cdn}/cdn/{file.sha256}?X-Sig=test")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("X-Linked-Etag", f'"{file.sha256}"')
            self.send_header("X-Linked-Size", str(len(file.content)))
            self.send_header("ETag", f'W/"{file.git_sha1}"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            return 302, 0
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{file.git_sha1}"')
        self.send_header("Content-Length", str(len(file.content)))
        self.end_headers()
        if not head:
            self.wfile.write(file.content)
            return 200, len(file.content)
        return 200, 0

    def _cdn(self, sha: str, head: bool) -> tuple[int, int]:
        hub = self.server_hub
        file = hub.blob(sha)
        if file is None:
            return self._error(404, "NotFound", "no such object", head), 0
        if not head and hub.mode == "cut_then_fail" and hub._cut_done:
            return self._error(500, "ServerError", "storage unavailable", head), 0
        content = file.content
        if hub.mode == "corrupt":
            flipped = bytearray(content)
            flipped[7::4096] = bytes(b ^ 0xFF for b in flipped[7::4096])
            content = bytes(flipped)
        start, end = 0, len(content) - 1
        range_header = self.headers.get("Range")
        if range_header is not None and (match := _RANGE.match(range_header)) is not None:
            start = int(match[1])
            end = int(match[2]) if match[2] else end
            if start >= len(content):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(content)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return 416, 0
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(content)}")
        else:
            self.send_response(200)
        body = content[start : end + 1]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{sha}"')
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        status = 206 if range_header else 200
        if head:
            return status, 0
        cut = hub.take_cut(len(body))
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # drop the connection mid-body
            return status, cut
        if hub.rate is None:
            self.wfile.write(body)
            return status, len(body)
        sent = 0
        rate = hub.rate  # read once: a test may lift it for the next transfer
        chunk = max(1, rate // 20)  # 20 writes a second
        with contextlib.suppress(ConnectionError):  # the client went away (killed, say)
            while sent < len(body):
                self.wfile.write(body[sent : sent + chunk])
                self.wfile.flush()
                sent += len(body[sent : sent + chunk])
                time.sleep(chunk / rate)
        self.close_connection = sent < len(body)
        return status, sent
