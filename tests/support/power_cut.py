"""A power cut mid-write (issue 27, item 6): kill -9 at a random point while each writer runs,
then what the next start finds. Writers: `lalo models pull` (the hub stand-in, slowed down), the
activity store of a `lalo up` serving streams, a prompt-cache save on unload. Each case returns
a CaseResult (tests/support/faults.py); tests/integration/test_power_cut.py runs one kill of
each, bench/faults.py twenty. And `lalo build`, killed while it copies and archives.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from tests.integration.hub_server import HubServer, Repo, RepoFile
from tests.support.faults import PARIS_QUESTION, CaseResult, Stack, summary
from tests.support.lalo import FAST_SUPERVISOR, LaloUp, lalo_env, wait_until, write_config

MiB = 1024**2
REPO = "org/model-GGUF"
FILE = "model-Q4_K_M.gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _orphans(pids: list[int], within: float = 10.0) -> list[int]:
    """The pids still alive `within` seconds from now (each one killed, so none stays)."""
    deadline = time.monotonic() + within
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    left = [pid for pid in pids if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


# --- lalo models pull ----------------------------------------------------------------------------
def pull_kills(stack: Stack, runs: int = 1, seed: int = 6, size: int = 24 * MiB,
               rate: int = 8 * MiB) -> CaseResult:
    """`lalo models pull hf://...` of a `size` file served at `rate` bytes/s, killed -9 at a random
    point of its transfer; then the same pull, which must resume from the bytes kept and verify.
    A partial file must never be at the blob's or the snapshot's path."""
    result = CaseResult("kill -9 of `lalo models pull` mid-download, then the pull again", runs)
    content = hashlib.sha256(b"power cut").digest() * (size // 32)
    sha = hashlib.sha256(content).hexdigest()
    chance = random.Random(seed)
    workdir = stack.workdir / "pull-kills"
    hub = HubServer({REPO: Repo(commit=COMMIT, files={FILE: RepoFile(content)})}, rate=rate)
    saw: Counter[str] = Counter()
    at_final = corrupt = resumed = failed = 0
    kept_fractions: list[float] = []
    again_s: list[float] = []
    with hub.running():
        env = {k: v for k, v in os.environ.items()
               if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
        env.update({"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"})
        argv = [sys.executable, "-m", "launcher", "models", "pull", f"hf://{REPO}/{FILE}", "--quiet"]
        for run in range(runs):
            home = workdir / f"run-{run}"
            shutil.rmtree(home, ignore_errors=True)
            env.update({"HF_HOME": str(home / "hf"), "LALO_CACHE_DIR": str(home / "lalo")})
            storage = home / "hf" / "hub" / "models--org--model-GGUF"
            partial = storage / "blobs" / f"{sha}.incomplete"
            final = [storage / "blobs" / sha, storage / "snapshots" / COMMIT / FILE]
            hub.rate = rate
            first = len(hub.cdn_gets())
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            try:
                wait_until(lambda p=partial: p.exists() and p.stat().st_size > 0, 60,
                           0.01, message="the transfer under way")
                time.sleep(chance.uniform(0.0, 0.9 * size / rate))
                os.kill(proc.pid, signal.SIGKILL)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(30)
            kept = partial.stat().st_size if partial.exists() else 0
            kept_fractions.append(kept / size)
            at_final += any(p.exists() or p.is_symlink() for p in final)
            # what was kept must be a prefix of the file, or the resume would build a wrong one
            if kept and not content.startswith(partial.read_bytes()):
                corrupt += 1
            hub.rate = None
            # the killed transfer is recorded once the server's next write fails
            wait_until(lambda n=first: len(hub.cdn_gets()) > n, 10, message="the killed transfer recorded")
            before = len(hub.cdn_gets())
            started = time.monotonic()
            again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120,
                                   stdin=subprocess.DEVNULL, check=False)
            again_s.append(time.monotonic() - started)
            pointer = final[1]
            ok = (again.returncode == 0 and pointer.exists()
                  and hashlib.sha256(pointer.read_bytes()).hexdigest() == sha and not partial.exists())
            failed += not ok
            wait_until(lambda n=before: len(hub.cdn_gets()) > n, 10, message="the transfer recorded")
            ranges = [get.range for get in hub.cdn_gets()[before:]]
            if ok and kept and ranges == [f"bytes={kept}-"]:
                resumed += 1
                saw["resumed from the bytes kept, verified"] += 1
            elif ok:
                saw[f"completed ({kept} B kept, ranges {ranges}), verified"] += 1
            else:
                saw[f"pull again failed: exit {again.returncode} {again.stderr.strip()[-160:]}"] += 1
            shutil.rmtree(home, ignore_errors=True)
    result.client_saw = summary(saw)
    result.errors = failed + corrupt + at_final
    result.timings = {"kept_min_fraction": min(kept_fractions), "kept_max_fraction": max(kept_fractions),
                      "pull_again_max_s": max(again_s)}
    result.notes.append("kept at the kill (fraction of the file): "
                        + ", ".join(f"{f:.2f}" for f in kept_fractions))
    result.check("a partial file never at the blob's or the snapshot's path", at_final == 0, at_final)
    result.check("the bytes kept are a prefix of the file (no corrupt partial)", corrupt == 0, corrupt)
    result.check("the next pull completes and verifies, every run", failed == 0, f"{runs - failed} of {runs}")
    result.check("the next pull resumes from the bytes kept (one ranged request)",
                 resumed == sum(1 for f in kept_fractions if f > 0), f"{resumed} of {runs}")
    return result


# --- the activity store of lalo up ---------------------------------------------------------------
def store_check(database: Path) -> tuple[str, int]:
    """integrity_check and row count of a copy of `database` and its WAL: what the next start
    will open (the live files are left alone; opening them would replay the WAL for lalo)."""
    copy = database.parent / "check"
    copy.mkdir(exist_ok=True)
    for suffix in ("", "-wal"):
        target = copy / f"{database.name}{suffix}"
        target.unlink(missing_ok=True)
        if Path(f"{database}{suffix}").exists():
            shutil.copyfile(f"{database}{suffix}", target)
    if not (copy / database.name).exists():
        return "no file", 0
    db = sqlite3.connect(copy / database.name)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0]), int(
            db.execute("SELECT count(*) FROM activity").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        return f"{type(exc).__name__}: {exc}", 0
    finally:
        db.close()


class _Streams:
    """Clients streaming completions back to back until stopped; counts answers and failures."""

    def __init__(self, url: str, model: str, clients: int = 4) -> None:
        self.url, self.model = url, model
        self.done = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        body = {"model": self.model, "prompt": "Hello", "max_tokens": 32, "stream": True,
                "ignore_eos": True}
        while not self.stop.is_set():
            try:
                with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=30) as reply:
                    for _ in reply.iter_lines():
                        pass
                self.done += 1
            except httpx.HTTPError:
                return  # lalo was killed

    def __enter__(self) -> _Streams:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def activity_kills(stack: Stack, runs: int = 1, seed: int = 6) -> CaseResult:
    """`lalo up` with the activity store, 4 streams running, kill -9 of lalo at a random point
    (the store is written every 2 s); the next start must open the store (integrity_check ok,
    nothing moved aside), serve the model, and keep writing rows. Model servers left by the
    killed lalo are counted (the kernel kills them with lalo, ChildRecords reaps them at the
    next start otherwise)."""
    result = CaseResult("kill -9 of `lalo up` while the activity store is written", runs)
    chance = random.Random(seed)
    home = stack.workdir / "activity-kills"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    state = home / "state"
    database = state / "activity.sqlite"
    config = write_config(home / "lalo.yaml", {"tiny": {"file": str(stack.tiny[0]), "ctx_size": 512}},
                          engines={"llama_server": {"path": str(stack.server)}},
                          supervisor=FAST_SUPERVISOR, proxy={"activity": {"store": True}})
    env = lalo_env(state, home / "config")
    bad: list[str] = []
    orphans = errors = 0
    rows: list[int] = []
    up = LaloUp(config, env).start()
    try:
        for _ in range(runs):
            up.wait_state("tiny", "ready")
            children = [p.pid for p in up.children()]
            with _Streams(up.url, "tiny"):
                time.sleep(chance.uniform(0.5, 5.0))
                up.signal(signal.SIGKILL)
                up.wait(30)
            up.stop()
            orphans += len(_orphans(children))
            check, count = store_check(database)
            rows.append(count)
            if check not in ("ok", "no file"):
                bad.append(check)
            up = LaloUp(config, env).start()  # the next start: it must serve and use the store
            ok = httpx.post(up.url + "/v1/completions", timeout=60.0, json={
                "model": "tiny", "prompt": "hello", "max_tokens": 2}).status_code == 200
            errors += not ok
        wait_until(lambda: store_check(database)[1] > rows[-1], 15, message="a row after the last start")
    finally:
        up.stop()
    final, count = store_check(database)
    if final != "ok":
        bad.append(final)
    aside = sorted(p.name for p in state.glob("activity.sqlite.damaged-*"))
    result.errors, result.orphans = errors + len(bad) + len(aside), orphans
    result.client_saw = (f"{runs} kills; the store opened after every one ({len(bad)} failed "
                         f"integrity_check, {len(aside)} moved aside); rows at the kills: "
                         f"{', '.join(map(str, rows))}; {count} at the end")
    result.check("integrity_check ok after every kill and at the end", not bad, bad or "ok")
    result.check("no store moved aside as damaged", not aside, aside or "none")
    result.check("the model served after every restart", errors == 0, f"{runs - errors} of {runs}")
    result.check("0 model servers left by the killed lalo", orphans == 0, orphans)
    result.check("rows kept across the kills", rows == sorted(rows) and count >= rows[-1],
                 f"{rows[-1] if rows else 0} -> {count}")
    return result


# --- a prompt-cache save -------------------------------------------------------------------------
SYSTEM = "You are a careful assistant. " + " ".join(
    f"Rule {i}: answer in plain words, keep it short, and never invent facts about item {i}."
    for i in range(16))  # ~400 tokens: a 9 MiB slot file for SmolLM2


def _ask(up: LaloUp) -> str:
    reply = httpx.post(up.url + "/v1/chat/completions", timeout=120.0, json={
        "model": "smol", "messages": [{"role": "system", "content": SYSTEM}, *PARIS_QUESTION],
        "temperature": 0, "max_tokens": 8})
    return str(reply.json()["choices"][0]["message"]["content"]) if reply.status_code == 200 else ""


def _unload(up: LaloUp) -> None:
    with contextlib.suppress(httpx.HTTPError):  # lalo is killed while it answers
        httpx.post(up.url + "/api/models/smol/unload", headers=up.headers(), timeout=60)


def _log_tail(state: Path, since: int) -> str:
    path = state / "logs" / "smol.log"
    return path.read_bytes()[since:].decode(errors="replace") if path.exists() else ""


def _log_size(state: Path) -> int:
    path = state / "logs" / "smol.log"
    return path.stat().st_size if path.exists() else 0


def prompt_cache_kills(stack: Stack, runs: int = 1, seed: int = 6) -> CaseResult:
    """SmolLM2 with the prompt cache; a ~400-token chat fills the slot, then an unload saves it
    and lalo is killed -9: half the runs the moment the save's `.part` file appears, half after
    a random 0-300 ms. The next start must remove any `.part`, restore only a whole slot file
    (a slot the server refuses is deleted), and answer right ("Paris"). A last run plants a
    truncated slot file: it must be refused and deleted, never served."""
    result = CaseResult("kill -9 of `lalo up` during a prompt-cache save, then a start", runs + 1)
    chance = random.Random(seed)
    home = stack.workdir / "prompt-cache-kills"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    state, cache = home / "state", home / "cache"
    config = write_config(home / "lalo.yaml", {"smol": {"file": str(stack.smollm2), "ctx_size": 2048}},
                          engines={"llama_server": {"path": str(stack.server)}}, supervisor=FAST_SUPERVISOR)
    env = lalo_env(state, home / "config", {"LALO_CACHE_DIR": str(cache)})
    saw: Counter[str] = Counter()
    at_kill: Counter[str] = Counter()
    parts_left = wrong = orphans = restored = refused = 0
    up = LaloUp(config, env).start()
    try:
        for run in range(runs):
            up.wait_state("smol", "ready")
            wrong += "Paris" not in _ask(up)
            children = [p.pid for p in up.children()]
            unload = threading.Thread(target=_unload, args=(up,), daemon=True)
            unload.start()
            if run % 2 == 0:
                try:
                    wait_until(lambda: any(cache.glob("prompt-cache/smol/*/*.part")), 10, 0.001,
                               message="the save's .part file")
                except AssertionError:
                    pass
            else:
                time.sleep(chance.uniform(0.0, 0.3))
            up.signal(signal.SIGKILL)
            up.wait(30)
            at_kill[", ".join(sorted(p.suffix for p in cache.glob("prompt-cache/smol/*/*"))) or "none"] += 1
            up.stop()
            unload.join(60)
            orphans += len(_orphans(children))
            mark = _log_size(state)
            up = LaloUp(config, env).start()
            up.wait_state("smol", "ready", 120)
            parts_left += len(list(cache.glob("prompt-cache/smol/*/*.part")))
            answer = _ask(up)
            wrong += "Paris" not in answer
            log = _log_tail(state, mark)
            restored += "prompt cache: restored" in log
            refused += "restore refused" in log or "restore failed" in log
            saw["restored, then Paris" if "prompt cache: restored" in log and "Paris" in answer
                else "nothing restored, then Paris" if "Paris" in answer
                else f"answer: {answer!r}"] += 1
        # a slot file cut short by hand (as a disk without ordered writes could leave it)
        up.wait_state("smol", "ready")
        _ask(up)
        up.stop()
        slots = list(cache.glob("prompt-cache/smol/*/slot-0.slot"))
        planted = "none"
        if slots:
            data = slots[0].read_bytes()
            slots[0].write_bytes(data[: len(data) // 2])
            (slots[0].parent / "slot-0.slot.part").write_bytes(data[: len(data) // 3])
            mark = _log_size(state)
            up = LaloUp(config, env).start()
            up.wait_state("smol", "ready", 120)
            log = _log_tail(state, mark)
            answer = _ask(up)
            turned_down = "restore refused" in log or "restore failed" in log
            if "SIGABRT" in log:
                result.notes.append("llama-server aborted on the truncated slot file "
                                    "(GGML_ASSERT(nread <= state_size)); lalo deleted it and restarted it")
            planted = (f"refused: {turned_down}, deleted: {not slots[0].exists()}, "
                       f".part removed: {not any(slots[0].parent.glob('*.part'))}, "
                       f"answer Paris: {'Paris' in answer}")
            wrong += "Paris" not in answer
            parts_left += len(list(slots[0].parent.glob("*.part")))
            result.check("a truncated slot file is refused and deleted, never restored",
                         turned_down and "prompt cache: restored" not in log
                         and not slots[0].exists(), planted)
        else:
            result.check("a slot file saved at a clean stop, to plant a truncated one", False, "none")
    finally:
        up.stop()
    result.client_saw = (summary(saw) + f"; on disk at the kill: {summary(at_kill)}; "
                         f"planted half slot: {planted}")
    result.errors, result.orphans = wrong + parts_left, orphans
    result.timings = {"restored_runs": restored, "refused_runs": refused}
    result.check("0 `.part` files after a start", parts_left == 0, parts_left)
    result.check("every answer after a start right ('Paris'): no corrupt slot served", wrong == 0, wrong)
    result.check("0 model servers left by the killed lalo", orphans == 0, orphans)
    result.check("a save was under way at some kills (.part on disk)",
                 any(".part" in key for key in at_kill), summary(at_kill))
    return result


# --- lalo build ----------------------------------------------------------------------------------
def _tree_ok(bundle: Path) -> bool:
    """Whether a bundle folder is whole: every file its manifest lists, with its sha256."""
    import json

    try:
        manifest = json.loads((bundle / "manifest.json").read_text())
        return all("link" in f or hashlib.sha256((bundle / f["path"]).read_bytes()).hexdigest()
                   == f["sha256"] for f in manifest["files"])
    except (OSError, ValueError, KeyError):
        return False


def build_kills(stack: Stack, runs: int = 1, seed: int = 6) -> CaseResult:
    """`lalo build SPEC --target bundle` killed -9 at a random point (copying the engine, the
    frozen lalo and the model, writing the archive), then the same build again into the same
    folder. Whatever is at the outputs' names must be whole at every moment; the next build
    removes what the killed one left and writes the same bytes as an uninterrupted build."""
    import json

    from tests.support.engine import test_engine_variant

    result = CaseResult("kill -9 of `lalo build --target bundle`, then the build again", runs)
    chance = random.Random(seed)
    workdir = stack.workdir / "build-kills"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    spec = workdir / "tiny.yaml"
    spec.write_text(json.dumps({
        "name": "tiny", "targets": ["bundle"], "platforms": ["linux"],
        "models": {"b": {"file": str(stack.tiny[1]), "license": "Apache-2.0", "ctx_size": 512}},
        "engine": {"llama_server": {"variant": test_engine_variant()}}}))
    env = {**os.environ, "LALO_FREEZE_IN_ROOT": os.environ.get("LALO_FREEZE_IN_ROOT", "0")}

    def build(out: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "launcher", "build", str(spec), "--target",
                               "bundle", "--out", str(out)], env=env, capture_output=True,
                              text=True, timeout=1800, stdin=subprocess.DEVNULL, check=False)

    started = time.monotonic()
    reference = build(workdir / "reference")
    whole_s = time.monotonic() - started
    if reference.returncode != 0:
        raise RuntimeError(f"the uninterrupted build failed: {reference.stderr[-600:]}")
    want = hashlib.sha256((workdir / "reference" / "tiny-bundle.tar.gz").read_bytes()).hexdigest()
    out = workdir / "out"
    saw: Counter[str] = Counter()
    corrupt = failed = left_after = 0
    left_at_kill: list[int] = []
    for _ in range(runs):
        proc = subprocess.Popen([sys.executable, "-m", "launcher", "build", str(spec), "--target",
                                 "bundle", "--out", str(out)], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(chance.uniform(0.5, 0.95 * whole_s))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        names = sorted(p.name for p in out.iterdir()) if out.exists() else []
        left_at_kill.append(sum(name.startswith(".") for name in names))
        archive, folder = out / "tiny-bundle.tar.gz", out / "tiny-bundle"
        if archive.exists() and hashlib.sha256(archive.read_bytes()).hexdigest() != want:
            corrupt += 1
        if folder.exists() and not _tree_ok(folder):
            corrupt += 1
        again = build(out)
        after = sorted(p.name for p in out.iterdir())
        same = (again.returncode == 0 and archive.exists()
                and hashlib.sha256(archive.read_bytes()).hexdigest() == want)
        failed += not same
        left_after += after != ["tiny-bundle", "tiny-bundle.tar.gz"]
        removed = again.stderr.count("left by a build that was killed mid-write")
        saw["the next build: the same bytes" + (f", removed {removed} left by the kill"
                                                if removed else "") if same
            else f"the next build: exit {again.returncode} {again.stderr.strip()[-160:]}"] += 1
    result.client_saw = summary(saw)
    result.errors = corrupt + failed + left_after
    result.timings = {"uninterrupted_build_s": whole_s}
    result.notes.append("partial entries in the folder at each kill: "
                        + ", ".join(map(str, left_at_kill)))
    result.check("nothing at an output's name is partial after a kill", corrupt == 0, corrupt)
    result.check("the next build completes with the uninterrupted build's bytes", failed == 0,
                 f"{runs - failed} of {runs}")
    result.check("nothing the killed build left remains after the next", left_after == 0,
                 left_after)
    return result
