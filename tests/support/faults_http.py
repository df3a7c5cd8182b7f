"""Fault cases at the HTTP edge: malformed requests on raw sockets and bad JSON bodies.

Same shape as tests/support/faults.py (a fresh `lalo up` per case, a `CaseResult` with the
checks the issue demands); lalo must answer 4xx or close, never 5xx or hang, and stay healthy.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from tests.support.faults import CaseResult, Stack, healthy, summary


# --- malformed HTTP over raw sockets -------------------------------------------------------------
@dataclass
class RawReply:
    status: int | None  # None: no status line
    closed: bool  # lalo closed the connection
    seconds: float
    left: bool = False  # the client went away without reading

    def describe(self) -> str:
        if self.left:
            return "client left"
        if self.status is not None:
            return f"{self.status}" + (", closed" if self.closed else "")
        return "closed, no answer" if self.closed else f"no answer in {self.seconds:.0f} s"


def raw_exchange(port: int, parts: list[bytes], *, pause: float = 0.0, half_close: bool = False,
                 leave: bool = False, timeout: float = 10.0,
                 during: Callable[[], None] | None = None) -> RawReply:
    """Send `parts` on one connection (`pause` seconds between them), then read a status line.
    `half_close`: shut our side for writing after sending; `leave`: close without reading;
    `during`: called while the connection is open, before reading."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for index, part in enumerate(parts):
            if index and pause:
                time.sleep(pause)
            try:
                sock.sendall(part)
            except OSError:
                return RawReply(None, True, time.monotonic() - started)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        if during is not None:
            during()
        if leave:
            return RawReply(None, False, time.monotonic() - started, left=True)
        data = b""
        sock.settimeout(0.2)
        deadline = max(started + timeout, time.monotonic() + 0.5)  # read at least once
        while b"\r\n" not in data and time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return RawReply(None, True, time.monotonic() - started)
            if not chunk:
                break
            data += chunk
        elapsed = time.monotonic() - started
        if b"\r\n" in data:
            line = data.split(b"\r\n", 1)[0].split()
            status = int(line[1]) if len(line) > 1 and line[1].isdigit() else None
            return RawReply(status, False, elapsed)
        return RawReply(None, time.monotonic() < deadline, elapsed)


def _post(body: bytes, *, length: int | None = None, extra: bytes = b"",
          path: bytes = b"/v1/chat/completions") -> bytes:
    size = len(body) if length is None else length
    return (b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + extra + b"Content-Length: " + str(size).encode() + b"\r\n\r\n")


def malformed_http(stack: Stack, stall: float = 3.0) -> CaseResult:
    """Bytes no client should send: lalo answers 4xx or closes, never 5xx or a hang, and the
    next request is 200. A client that sends half a body and stalls must not stop others."""
    result = CaseResult("malformed HTTP on raw sockets", 0)
    good = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2}).encode()
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    saw: list[str] = []  # what was not a plain refusal
    refused = unhealthy = errors = 0
    with stack.lalo("malformed", {"tiny": {"file": str(stack.tiny[0]), "ctx_size": 512}}) as up:
        up.wait_state("tiny", "ready")
        port = up.port
        during_stall: list[str] = []

        def others_served() -> None:
            ok, how = healthy(up, "tiny")
            during_stall.append(how if ok else f"NOT served: {how}")
            time.sleep(stall)

        cases: list[tuple[str, Callable[[], RawReply], bool]] = [
            # (name, exchange, must be answered 4xx or closed)
            ("garbage request line", lambda: raw_exchange(port, [b"HELLO THERE\r\n\r\n"]), True),
            ("bad chunk size", lambda: raw_exchange(port, [chunked + b"zz\r\n{}\r\n0\r\n\r\n"]), True),
            ("chunk longer than its size", lambda: raw_exchange(
                port, [chunked + b"2\r\n" + good + b"\r\n0\r\n\r\n"]), True),
            ("Content-Length shorter than the body", lambda: raw_exchange(
                port, [_post(good, length=10) + good]), True),
            ("Content-Length longer than the body, then EOF", lambda: raw_exchange(
                port, [_post(good, length=len(good) + 100) + good], half_close=True), True),
            ("200 kB header", lambda: raw_exchange(
                port, [_post(good, extra=b"X-Big: " + b"a" * 200_000 + b"\r\n") + good]), True),
            ("non-UTF-8 body", lambda: raw_exchange(
                port, [_post(b'{"model": "tiny", "prompt": "\xff\xfe\xfa"}')
                       + b'{"model": "tiny", "prompt": "\xff\xfe\xfa"}']), True),
            ("two Content-Length headers that differ", lambda: raw_exchange(
                port, [_post(good, extra=b"Content-Length: 3\r\n") + good]), True),
            (f"half a body, then stalls {stall:g} s", lambda: raw_exchange(
                port, [_post(good), good[: len(good) // 2]], timeout=stall,
                during=others_served), False),
            ("half a body, then goes away", lambda: raw_exchange(
                port, [_post(good), good[: len(good) // 2]], leave=True), False),
        ]
        for name, exchange, must_answer in cases:
            try:
                reply = exchange()
            except OSError as exc:
                reply = RawReply(None, True, 0.0)
                result.notes.append(f"{name}: {type(exc).__name__}")
            ok, how = healthy(up, "tiny")
            answered = reply.closed or (reply.status is not None and 400 <= reply.status < 500)
            if must_answer and answered:
                refused += 1
            else:
                saw.append(f"{name}: {reply.describe()}")
            unhealthy += not ok
            if must_answer:
                result.check(f"{name}: 4xx or closed", answered, reply.describe())
            result.check(f"{name}: lalo healthy after", ok, how)
            errors += (must_answer and not answered) or not ok
        result.check("others served while a client stalls mid-body",
                     bool(during_stall) and all(not s.startswith("NOT") for s in during_stall),
                     "; ".join(during_stall) or "not tried")
        result.runs = len(cases)
    must = sum(1 for _, _, must_answer in cases if must_answer)
    result.client_saw = (f"4xx or closed on {refused} of {must} malformed requests; "
                         + "; ".join(saw) + f"; the next request 200 after {len(cases) - unhealthy} "
                         f"of {len(cases)}")
    result.errors = errors
    result.lost = None
    return result


# --- bad JSON bodies -----------------------------------------------------------------------------
BAD_BODIES: list[tuple[str, bytes, int]] = [
    ("not JSON", b"{not json", 400),
    ("empty body", b"", 400),
    ("a JSON array", b"[1, 2]", 400),
    ("a JSON string", b'"model"', 400),
    ("model is a number", b'{"model": 5}', 400),
    ("model is NaN", b'{"model": NaN}', 400),
    ("no model", b'{"messages": []}', 400),
    ("cut short", b'{"model": "tiny", "messages": [', 400),
    ("trailing garbage", b'{"model": "tiny"}}}}', 400),
    ("invalid UTF-8", b'{"model": "tiny\xff"}', 400),
    ("nested 100,000 deep", b"[" * 100_000, 400),
    ("unknown model", b'{"model": "gpt-9"}', 404),
]


def bad_json(stack: Stack) -> CaseResult:
    """Bodies that are not what the OpenAI routes take: lalo's own error envelope with the
    right status (400, 404 for an unknown model), on two routes, and lalo healthy after."""
    result = CaseResult("bad JSON bodies", 0)
    saw: Counter[str] = Counter()
    errors = 0
    with stack.lalo("bad-json", {"tiny": {"file": str(stack.tiny[0]), "ctx_size": 512}}) as up:
        up.wait_state("tiny", "ready")
        for route in ("/v1/chat/completions", "/v1/completions"):
            for name, body, expected in BAD_BODIES:
                result.runs += 1
                try:
                    reply = httpx.post(up.url + route, content=body, timeout=30.0,
                                       headers={"content-type": "application/json"})
                    status = reply.status_code
                    try:
                        error = reply.json()["error"]
                        envelope = set(error) == {"message", "type", "code"}
                    except (ValueError, KeyError, TypeError):
                        envelope = False
                except httpx.HTTPError as exc:
                    status, envelope = 0, False
                    result.notes.append(f"{route} {name}: {type(exc).__name__}")
                good = status == expected and envelope
                saw[f"{status}{' envelope' if envelope else ' NO envelope'}"] += 1
                result.check(f"{route} {name}: {expected} with the error envelope", good,
                             f"{status}, envelope {envelope}")
                errors += not good
        ok, how = healthy(up, "tiny")
        result.check("lalo healthy after", ok, how)
        errors += not ok
    result.client_saw = summary(saw)
    result.errors = errors
    return result
