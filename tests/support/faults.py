"""Fault cases against a real `lalo up`: black-box, over HTTP, raw sockets and signals.

Each case starts its own lalo (so one fault cannot leak into the next), does what it says,
and returns a `CaseResult`: what the client saw, lost requests, orphans, errors, timings, and
the checks the issue demands (issue 14), each with its measured value. Process faults are here,
HTTP-edge faults in faults_http.py. The short cases run in tests/integration/test_faults.py;
bench/faults.py runs them all, adds the soak and the load, and writes docs/reliability.md.
Nothing here imports lalo's code, and every wait has a deadline: a case that meets a hang
records it and returns.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.support.lalo import FAST_SUPERVISOR, LaloUp, lalo_env, wait_until, write_config

PARIS_QUESTION = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]


@dataclass
class Check:
    """One demand of the issue and what was measured against it."""

    name: str
    ok: bool
    measured: str


@dataclass
class CaseResult:
    case: str
    runs: int
    client_saw: str = ""
    lost: int | None = None  # requests that should have been answered and were not
    orphans: int | None = None  # processes left behind
    errors: int | None = None  # answers the issue does not allow (5xx, hangs, exceptions)
    timings: dict[str, float] = field(default_factory=dict)  # seconds
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, measured: object) -> bool:
        self.checks.append(Check(name, bool(ok), str(measured)))
        return bool(ok)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def explain(self) -> str:
        failed = [f"  - {c.name}: measured {c.measured}" for c in self.checks if not c.ok]
        return (f"{self.case}: {len(failed)} of {len(self.checks)} checks failed\n"
                + "\n".join(failed) + f"\n  client saw: {self.client_saw}"
                + "".join(f"\n  note: {n}" for n in self.notes))

    def as_dict(self) -> dict[str, Any]:
        return {"case": self.case, "runs": self.runs, "client_saw": self.client_saw,
                "lost": self.lost, "orphans": self.orphans, "errors": self.errors,
                "timings": self.timings, "ok": self.ok,
                "checks": [c.__dict__ for c in self.checks], "notes": self.notes}


@dataclass(frozen=True)
class Stack:
    """What the cases run on: the llama-server binary, three random-weight models, the real
    SmolLM2 (where the answer matters), and a scratch directory."""

    server: Path
    tiny: tuple[Path, Path, Path]
    smollm2: Path
    workdir: Path

    @contextmanager
    def lalo(self, case: str, models: Mapping[str, Mapping[str, Any]], *,
             supervisor: Mapping[str, Any] | None = None, **sections: Any) -> Iterator[LaloUp]:
        """A fresh `lalo up` for one case, stopped (children included) when the case ends."""
        base = self.workdir / case
        base.mkdir(parents=True, exist_ok=True)
        index = len(list(base.glob("run-*")))
        run = base / f"run-{index}"
        run.mkdir()
        config = write_config(run / "lalo.yaml", models,
                              engines={"llama_server": {"path": str(self.server)}},
                              supervisor=dict(supervisor or FAST_SUPERVISOR), **sections)
        with LaloUp(config, lalo_env(run / "state", run / "config")) as up:
            yield up


# --- small helpers -------------------------------------------------------------------------------
def _child_key(pid: int) -> str:
    """The per-start key lalo gave its child (in the child's environment, not its argv)."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"LLAMA_API_KEY="):
            return item.split(b"=", 1)[1].decode()
    return ""


def _busy_slots(up: LaloUp, model: str) -> int:
    """Slots of `model`'s llama-server that are generating, asked of the server itself: a probe
    through lalo's /upstream would queue for a slot behind the very requests it looks for."""
    info = up.model(model)
    if info["pid"] is None or info["port"] is None:
        raise ValueError(f"{model} has no server running ({info['state']})")
    reply = httpx.get(f"http://127.0.0.1:{info['port']}/slots", timeout=5.0,
                      headers={"Authorization": f"Bearer {_child_key(int(info['pid']))}"})
    reply.raise_for_status()
    return sum(1 for slot in reply.json() if slot.get("is_processing"))


def _upstream_slots_answer(up: LaloUp, model: str, timeout: float = 2.0) -> str:
    """Whether lalo's pass-through answers GET /upstream/MODEL/slots in `timeout` seconds."""
    try:
        reply = httpx.get(f"{up.url}/upstream/{model}/slots", timeout=timeout)
    except httpx.TimeoutException:
        return f"no answer in {timeout:g} s"
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return str(reply.status_code)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def healthy(up: LaloUp, model: str) -> tuple[bool, str]:
    """lalo answers /health and a real request to `model` with 200."""
    try:
        health = httpx.get(up.url + "/health", timeout=10.0).status_code
        reply = httpx.post(up.url + "/v1/completions", timeout=60.0,
                           json={"model": model, "prompt": "hello", "max_tokens": 2})
    except httpx.HTTPError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return health == 200 and reply.status_code == 200, f"health {health}, request {reply.status_code}"


def _error_message(reply: httpx.Response) -> str:
    try:
        return str(reply.json()["error"]["message"])[:80]
    except (ValueError, KeyError, TypeError):
        return reply.text[:80]


def _error_code(reply: httpx.Response) -> str:
    try:
        return str(reply.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "no error envelope"


def summary(counter: Counter[str]) -> str:
    return ", ".join(f"{what} x{n}" for what, n in counter.most_common())


# --- kill -9 of a model server mid-stream --------------------------------------------------------
@dataclass
class _KillRun:
    saw: list[str] = field(default_factory=list)
    lost: int = 0
    errors: int = 0
    orphan: bool = False
    back: float | None = None  # seconds from the kill to ready again
    after_s: float | None = None  # seconds from the kill to the answer of a request sent then
    skipped: str | None = None


def _kill_once(up: LaloUp) -> _KillRun:
    run = _KillRun()
    pid = int(up.model("smol")["pid"])
    events: list[str] = []
    outcome: dict[str, Any] = {}

    def stream() -> None:
        body = {"model": "smol", "prompt": "Tell a long story.", "max_tokens": 1500,
                "stream": True, "ignore_eos": True}
        try:
            with httpx.stream("POST", up.url + "/v1/completions", json=body, timeout=60.0) as reply:
                for line in reply.iter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:].strip())
        except httpx.HTTPError as exc:
            outcome["stream_exc"] = type(exc).__name__

    def plain() -> None:
        body = {"model": "smol", "messages": PARIS_QUESTION, "max_tokens": 96,
                "temperature": 0, "ignore_eos": True}
        try:
            outcome["plain"] = httpx.post(up.url + "/v1/chat/completions", json=body, timeout=120.0)
        except httpx.HTTPError as exc:
            outcome["plain_exc"] = type(exc).__name__

    threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(events) >= 3 and _busy_slots(up, "smol") == 2
                   and "plain" not in outcome, 60, message="both requests generating")
    except AssertionError as exc:
        for thread in threads:
            thread.join(120)
        run.skipped = f"run skipped, not both in flight: {exc}"
        return run
    back: list[float] = []

    def watch() -> None:  # polls from the moment of the kill, whatever the clients do
        try:
            wait_until(lambda: (m := up.model("smol"))["state"] == "ready" and m["pid"] != pid,
                       60, 0.02, message="smol back")
            back.append(time.monotonic() - killed)
        except AssertionError:
            pass

    watcher = threading.Thread(target=watch)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    watcher.start()
    after = httpx.post(up.url + "/v1/chat/completions", timeout=120.0,
                       json={"model": "smol", "messages": PARIS_QUESTION, "max_tokens": 16,
                             "temperature": 0})
    run.after_s = time.monotonic() - killed
    for thread in [*threads, watcher]:
        thread.join(120)
    if back:
        run.back = back[0]
    else:
        run.errors += 1
        run.saw.append("never back to ready in 60 s")
    # the stream had sent bytes: it ends with lalo's error event
    last = json.loads(events[-1]) if events and events[-1].startswith("{") else {}
    if isinstance(last, dict) and "error" in last:
        run.saw.append("stream: error event after partial output")
    elif "stream_exc" in outcome:
        run.saw.append(f"stream: {outcome['stream_exc']} (no error event)")
        run.errors += 1
    else:
        run.saw.append(f"stream: ended without an error event ({events[-1][:40] if events else ''})")
        run.errors += 1
    # the non-streamed request had sent nothing: it is retried and answers right
    plain_reply = outcome.get("plain")
    if plain_reply is not None and plain_reply.status_code == 200:
        text = plain_reply.json()["choices"][0]["message"]["content"]
        run.saw.append("in-flight non-streamed: 200" + (" Paris" if "Paris" in text else " WRONG"))
        run.lost += "Paris" not in text
    else:
        run.lost += 1
        code = plain_reply.status_code if plain_reply is not None else outcome.get("plain_exc")
        message = _error_message(plain_reply) if plain_reply is not None else ""
        run.saw.append(f"in-flight non-streamed: {code} {message}".strip())
    # the request sent during the restart waits for it, or is told when to come back
    if after.status_code == 200:
        run.saw.append("request during restart: 200 (waited)")
    else:
        run.saw.append(f"request during restart: {after.status_code} {_error_message(after)}")
        if not (after.status_code == 503 and "retry-after" in after.headers):
            run.lost += 1
            run.errors += 1
    run.orphan = _alive(pid)
    return run


def kill_model_mid_stream(stack: Stack, runs: int = 2) -> CaseResult:
    """The real SmolLM2 with 2 slots: one stream and one non-streamed request in flight, then
    kill -9 of its server, then a request at once. The stream had sent bytes: it must end with
    an error event. The non-streamed request had sent nothing: it must be retried once and
    answer right ("Paris"). The request sent during the restart must wait (200) or get 503
    with Retry-After, never 502. Also: time back to ready, and the killed server gone."""
    result = CaseResult("kill -9 of a model server mid-stream", runs)
    done: list[_KillRun] = []
    with stack.lalo("kill-model", {"smol": {"file": str(stack.smollm2), "ctx_size": 4096,
                                            "parallel": 2}}) as up:
        up.wait_state("smol", "ready")
        for _ in range(runs):
            run = _kill_once(up)
            if run.skipped:
                result.notes.append(run.skipped)
            else:
                done.append(run)
    back = [r.back for r in done if r.back is not None]
    result.client_saw = summary(Counter(line for r in done for line in r.saw))
    result.lost = sum(r.lost for r in done)
    result.errors = sum(r.errors for r in done)
    result.orphans = sum(r.orphan for r in done)
    after = [r.after_s for r in done if r.after_s is not None]
    if back:
        result.timings = {"back_to_ready_max_s": max(back), "back_to_ready_mean_s": sum(back) / len(back)}
    if after:
        result.timings["request_during_restart_max_s"] = max(after)
    result.check("every run had both requests in flight at the kill", len(done) == runs,
                 f"{len(done)} of {runs}")
    result.check("0 lost requests (in-flight non-streamed retried, answers 'Paris'; no 502 "
                 "during the restart)", result.lost == 0, result.lost)
    result.check("0 errors", result.errors == 0, result.errors)
    result.check("0 orphans (killed servers reaped)", result.orphans == 0, result.orphans)
    return result


# --- SIGSTOP of a model server -------------------------------------------------------------------
def _wait_replaced(up: LaloUp, pid: int, detected: list[float], replaced: list[float],
                   stopped: float, saw: Counter[str]) -> None:
    wait_until(lambda: (m := up.model("tiny"))["pid"] != pid or m["state"] != "ready",
               60, 0.02, message="hang found")
    detected.append(time.monotonic() - stopped)
    model = wait_until(lambda: (m := up.model("tiny"))["state"] == "ready" and m["pid"] != pid and m,
                       60, 0.02, message="replaced")
    replaced.append(time.monotonic() - stopped)
    reason = str(model.get("last_error")).splitlines()[0][:60]
    saw[f"replaced; last_error: {reason}"] += 1


def sigstop_model(stack: Stack, runs: int = 1) -> CaseResult:
    """A server that stops answering (SIGSTOP) is found hung within liveness_timeout (plus one
    health interval and the probe's own timeout) and replaced; the stopped process is gone."""
    result = CaseResult("SIGSTOP of a model server", runs)
    liveness = float(FAST_SUPERVISOR["liveness_timeout"])
    bound = 2 * liveness + float(FAST_SUPERVISOR["health_interval"])
    detected: list[float] = []
    replaced: list[float] = []
    saw: Counter[str] = Counter()
    orphans = errors = 0
    with stack.lalo("sigstop", {"tiny": {"file": str(stack.tiny[0]), "ctx_size": 512}}) as up:
        up.wait_state("tiny", "ready")
        for _ in range(runs):
            pid = int(up.model("tiny")["pid"])
            os.kill(pid, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                _wait_replaced(up, pid, detected, replaced, stopped, saw)
            except AssertionError as exc:
                errors += 1
                saw[f"not replaced: {str(exc)[:80]}"] += 1
            if _alive(pid):
                orphans += 1
                os.kill(pid, signal.SIGKILL)
        ok, how = healthy(up, "tiny")
        errors += not ok
        saw[f"next request: {how}"] += 1
    result.client_saw = summary(saw)
    result.orphans, result.errors, result.lost = orphans, errors, None
    if detected:
        result.timings = {"liveness_timeout_s": liveness, "detect_max_s": max(detected)}
    if replaced:
        result.timings["replaced_max_s"] = max(replaced)
    result.check(f"hang detected within {bound:g} s (liveness_timeout {liveness:g} s)",
                 len(detected) == runs and max(detected) <= bound,
                 f"{max(detected):.2f} s" if detected else "never")
    result.check("replaced by a new server every time", len(replaced) == runs, f"{len(replaced)} of {runs}")
    result.check("0 orphans (the stopped server killed)", orphans == 0, orphans)
    result.check("0 errors", errors == 0, errors)
    return result


# --- kill -9 of lalo -----------------------------------------------------------------------------
def kill_lalo(stack: Stack, runs: int = 1) -> CaseResult:
    """kill -9 of `lalo up` with two servers running: both are gone within 2 s, by themselves."""
    result = CaseResult("kill -9 of lalo", runs)
    gone: list[float] = []
    counted: list[int] = []
    orphans = 0
    for _ in range(runs):
        models = {"a": {"file": str(stack.tiny[0]), "ctx_size": 512},
                  "b": {"file": str(stack.tiny[1]), "ctx_size": 512}}
        with stack.lalo("kill-lalo", models) as up:
            up.wait_state("a", "ready")
            up.wait_state("b", "ready")
            children = [p.pid for p in up.children()]
            counted.append(len(children))
            up.signal(signal.SIGKILL)
            killed = time.monotonic()
            up.wait(30)
            deadline = killed + 10.0
            while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
                time.sleep(0.01)
            left = [pid for pid in children if _alive(pid)]
            if left:
                orphans += len(left)
                for pid in left:
                    os.kill(pid, signal.SIGKILL)
            else:
                gone.append(time.monotonic() - killed)
    result.orphans, result.errors = orphans, orphans
    result.client_saw = (f"{sum(counted)} children over {runs} runs ({orphans} left behind); "
                         f"in {len(gone)} of {runs} runs all were gone by themselves")
    if gone:
        result.timings = {"children_gone_max_s": max(gone)}
    result.check("both model servers were running at the kill, every run",
                 counted == [2] * runs, counted)
    result.check("0 orphans after 10 s", orphans == 0, orphans)
    result.check("children gone within 2 s", len(gone) == runs and max(gone) <= 2.0,
                 f"{max(gone):.2f} s" if gone else "never")
    return result


# --- 30 early disconnects, then a request --------------------------------------------------------
def _disconnect_early(port: int, body: bytes, stream: bool, hold: float) -> str:
    """Send one request on a raw socket and leave: after `hold` seconds, or (stream) at the
    first bytes of the answer. What the client saw before it left."""
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        if not stream:
            time.sleep(hold)
            return "left before the answer"
        sock.settimeout(hold)
        try:
            first = sock.recv(4096)
        except TimeoutError:
            return f"no byte in {hold:g} s (queued), left"
        return "left after the first bytes" if first else "closed by lalo"


def early_disconnects(stack: Stack, clients: int = 30, settle: float = 1.0) -> CaseResult:
    """The real SmolLM2 with 2 slots; 30 clients send long requests (1,500 tokens) at once and
    go away early: a third streamed (leave at the first bytes), two thirds not streamed (leave
    after 0.1 s, while queued, or after 0.6 s). Within `settle` s (the target: 1) no slot may
    still be generating, lalo's queue must be empty, and the next request is answered at once
    ("Paris")."""
    result = CaseResult(f"{clients} early disconnects, then a request", clients)
    with stack.lalo("disconnects", {"smol": {"file": str(stack.smollm2), "ctx_size": 4096,
                                             "parallel": 2}},
                    proxy={"queue_size": 64}) as up:
        up.wait_state("smol", "ready")
        port = up.port

        def one(index: int) -> str:
            kind = index % 3
            body = json.dumps({"model": "smol", "max_tokens": 1500, "ignore_eos": True,
                               "stream": kind == 0,
                               "messages": [{"role": "user", "content": "Tell a long story."}]})
            return _disconnect_early(port, body.encode(), kind == 0, 3.0 if kind == 0 else
                                     (0.1 if kind == 1 else 0.6))

        with ThreadPoolExecutor(clients) as pool:
            saw = Counter(pool.map(one, range(clients)))
        left = time.monotonic()
        probe: list[str] = []  # lalo's own pass-through to /slots, asked at the same moment
        prober = threading.Thread(target=lambda: probe.append(_upstream_slots_answer(up, "smol")))
        prober.start()
        busy_at_settle: int | None = None
        idle_after: float | None = None
        deadline = left + 30.0
        while time.monotonic() < deadline:
            busy = _busy_slots(up, "smol")
            now = time.monotonic() - left
            if busy_at_settle is None and now >= settle:
                busy_at_settle = busy
            if busy == 0:
                idle_after = now
                busy_at_settle = 0 if busy_at_settle is None else busy_at_settle
                break
            time.sleep(0.05)
        model = up.model("smol")
        queued = int(model["queued"]) + int(model["in_flight"])
        asked = time.monotonic()
        try:
            reply = httpx.post(up.url + "/v1/chat/completions", timeout=60.0,
                               json={"model": "smol", "messages": PARIS_QUESTION,
                                     "max_tokens": 16, "temperature": 0})
            answered = time.monotonic() - asked
            text = reply.json()["choices"][0]["message"]["content"] if reply.status_code == 200 else ""
            follow = f"{reply.status_code}" + (" Paris" if "Paris" in text else "")
        except httpx.HTTPError as exc:
            answered = time.monotonic() - asked
            follow = f"{type(exc).__name__} after {answered:.0f} s"
        prober.join(10)
    result.client_saw = summary(saw) + f"; next request: {follow}"
    result.notes.append(f"GET /upstream/smol/slots as the clients left: {probe[0] if probe else '?'}")
    result.lost = 0 if follow.endswith("Paris") else 1
    result.errors = result.lost
    result.timings = ({"slots_idle_after_s": idle_after} if idle_after is not None
                      else {"slots_still_busy_after_s": 30.0})
    result.timings["next_request_s"] = answered
    result.check(f"no slot generating {settle:g} s after the clients left", busy_at_settle == 0,
                 f"{busy_at_settle} busy at {settle:g} s, idle after "
                 + (f"{idle_after:.2f} s" if idle_after is not None else "> 30 s"))
    result.check("lalo's queue empty once the slots are idle", queued == 0,
                 f"{queued} queued or in flight")
    result.check("next request answered 'Paris' within 10 s", follow.endswith("Paris") and answered <= 10,
                 f"{follow} in {answered:.2f} s")
    return result


# --- mixed traffic over three on-demand models, max_loaded 2 -------------------------------------
def mixed_on_demand(stack: Stack, requests: int = 36) -> CaseResult:
    """Three on-demand models, at most two loaded: 36 requests at once, interleaved a, b, c.
    All must be 200 and answered by the model they named (requests wait, never 503)."""
    result = CaseResult(f"mixed traffic, 3 on-demand models, max_loaded 2, {requests} at once", 1)
    names = ("a", "b", "c")
    models = {name: {"file": str(path), "ctx_size": 512, "preload": False}
              for name, path in zip(names, stack.tiny, strict=True)}
    examples: dict[int, str] = {}
    with stack.lalo("mixed", models, resources={"max_loaded": 2}, proxy={"queue_size": 64}) as up:

        def one(index: int) -> str:
            name = names[index % 3]
            try:
                reply = httpx.post(up.url + "/v1/completions", timeout=120.0,
                                   json={"model": name, "prompt": "hello", "max_tokens": 8})
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}"
            if reply.status_code == 200:
                return "200" if reply.json().get("model") == name else "200 from the wrong model"
            examples.setdefault(reply.status_code, _error_message(reply))
            return f"{reply.status_code} {_error_code(reply)}"

        started = time.monotonic()
        with ThreadPoolExecutor(requests) as pool:
            saw = Counter(pool.map(one, range(requests)))
        wall = time.monotonic() - started
        loaded = sum(m["state"] in ("ready", "starting") for m in up.status()["models"])
    ok = saw["200"]
    result.client_saw = summary(saw)
    result.notes.extend(f"a {status}: {message}" for status, message in examples.items())
    result.lost = requests - ok
    result.errors = requests - ok
    result.timings = {"all_answered_s": wall}
    result.check(f"all {requests} answered 200 by the model named", ok == requests, f"{ok} of {requests}")
    result.check("at most 2 models loaded afterwards", loaded <= 2, loaded)
    return result
