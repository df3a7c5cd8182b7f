"""A full disk where lalo writes (issue 27, item 4), on a real small filesystem (a tmpfs with a
size): a prompt-cache save, the activity store, a hub pull. Each must fail with one clear
message naming the path and the room, leave nothing half-written where it could be read as
whole, and leave the model being served alone."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.hub_server import HubServer, Repo, RepoFile
from tests.support.lalo import FAST_SUPERVISOR, LaloUp, lalo_env, wait_until, write_config
from tests.support.small_disk import MountRefused, fill, free_bytes, resize, small_disk

pytestmark = pytest.mark.integration

MiB = 1024**2
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]
REPO = "org/model-GGUF"
FILE = "model-Q4_K_M.gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONTENT = hashlib.sha256(b"full disk").digest() * (24 * MiB // 32)
SHA = hashlib.sha256(CONTENT).hexdigest()

Mount = Callable[[Path, int], Path]


@pytest.fixture
def mount() -> Iterator[Mount]:
    """Mounts a tmpfs of a given size (skips where mounting is not permitted); all are
    unmounted when the test ends."""
    with contextlib.ExitStack() as stack:
        def make(path: Path, size: int) -> Path:
            try:
                return stack.enter_context(small_disk(path, size))
            except MountRefused as exc:
                pytest.skip(f"a full disk needs a small filesystem: {exc}")
        yield make


def ask(up: LaloUp, model: str, system: str = "") -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + QUESTION
    reply = httpx.post(up.url + "/v1/chat/completions", timeout=120.0, json={
        "model": model, "messages": messages, "temperature": 0, "max_tokens": 8})
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def model_log(state: Path, name: str) -> str:
    path = state / "logs" / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


# --- a prompt-cache save -------------------------------------------------------------------
def test_a_prompt_cache_save_on_a_full_disk_keeps_nothing_and_the_model_answers_again(
    tmp_path: Path, mount: Mount, llama_server_bin: Path, smollm2: Path,
) -> None:
    cache = mount(tmp_path / "cache", MiB)  # SmolLM2 keeps ~23 KiB of KV per token: 150 is 3.4 MiB
    state = tmp_path / "state"
    config = write_config(tmp_path / "lalo.yaml", {"smol": {"file": str(smollm2), "ctx_size": 2048}},
                          engines={"llama_server": {"path": str(llama_server_bin)}},
                          supervisor=FAST_SUPERVISOR)
    system = "You are a careful assistant. " + " ".join(
        f"Rule {i}: keep it short and never invent facts about item {i}." for i in range(8))
    with LaloUp(config, lalo_env(state, tmp_path / "config", {"LALO_CACHE_DIR": str(cache)})) as up:
        up.wait_state("smol", "ready")
        assert "Paris" in ask(up, "smol", system)
        unloaded = httpx.post(up.url + "/api/models/smol/unload", headers=up.headers(), timeout=60)
        assert unloaded.status_code == 200, unloaded.text
        up.wait_state("smol", "stopped")

        log = model_log(state, "smol")
        failed = [line for line in log.splitlines() if "prompt cache: slot 0 save" in line]
        assert failed, log[-3000:]
        slot_dir = next((cache / "prompt-cache" / "smol").iterdir())
        # one line: what failed, the server's reason, the directory and its free space
        assert re.search(r"slot 0 save refused \(500\): .*; [\d.]+ (B|KiB|MiB) free in "
                         + re.escape(str(slot_dir)) + r" \(the served model is not affected\)",
                         failed[0]), failed
        left = sorted(p.name for p in cache.rglob("*") if p.is_file())
        assert not [name for name in left if name.endswith((".slot", ".part"))], left

        loaded = httpx.post(up.url + "/api/models/smol/load", headers=up.headers(), timeout=120)
        assert loaded.status_code == 200, loaded.text
        assert "Paris" in ask(up, "smol", system)
        assert "prompt cache: restored" not in model_log(state, "smol")


# --- the activity store -----------------------------------------------------------------------
def rows_in(database: Path) -> tuple[str, int]:
    """integrity_check and the row count of a copy of `database` (the copy takes its WAL, so
    the live file is left to lalo)."""
    copy = database.parent.parent / f"copy-{os.getpid()}"
    copy.mkdir(exist_ok=True)
    for suffix in ("", "-wal"):
        source = Path(f"{database}{suffix}")
        target = copy / f"{database.name}{suffix}"
        target.unlink(missing_ok=True)
        if source.exists():
            target.write_bytes(source.read_bytes())
    db = sqlite3.connect(copy / database.name)
    try:
        check = db.execute("PRAGMA integrity_check").fetchone()[0]
        count = db.execute("SELECT count(*) FROM activity").fetchone()[0]
    finally:
        db.close()
    return str(check), int(count)


def test_the_activity_store_on_a_full_disk_says_where_and_keeps_what_it_had(
    tmp_path: Path, mount: Mount, llama_server_bin: Path, small_model: Path,
) -> None:
    state = mount(tmp_path / "state", 4 * MiB)
    database = state / "activity.sqlite"
    config = write_config(tmp_path / "lalo.yaml", {"tiny": {"file": str(small_model), "ctx_size": 512}},
                          engines={"llama_server": {"path": str(llama_server_bin)}},
                          supervisor=FAST_SUPERVISOR, proxy={"activity": {"store": True}})

    def complete() -> int:
        return httpx.post(up.url + "/v1/completions", timeout=60.0, json={
            "model": "tiny", "prompt": "hello", "max_tokens": 4}).status_code

    with LaloUp(config, lalo_env(state, tmp_path / "config")) as up:
        up.wait_state("tiny", "ready")
        assert [complete() for _ in range(5)] == [200] * 5
        wait_until(lambda: database.exists() and rows_in(database)[1] == 5, 15,
                   message="the first 5 requests in the store")
        filler = fill(state)
        assert free_bytes(state) < 4096
        # the disk is full: requests are still served (more than the 64 KiB of server output a
        # pipe holds: a model log that stopped being read would hang the server), and the
        # failed batch is said in one line
        assert [complete() for _ in range(150)] == [200] * 150
        assert f"cannot write {state / 'logs' / 'tiny.log'} (No space left on device;" in up.output()
        warning = wait_until(lambda: next((line for line in up.output().splitlines()
                                           if "could not write the SQLite copy" in line), None),
                             15, message="the store's warning")
        assert re.search(re.escape(str(database)) + r": database or disk is full \([\d.]+ (B|KiB) "
                         r"free there\); \d+ request\(s\) kept in memory only, the store is "
                         r"unchanged", warning), warning
        assert rows_in(database) == ("ok", 5)
        activity = httpx.get(up.url + "/api/activity?n=100", headers=up.headers(), timeout=5)
        assert activity.json()["total"] == 155  # the history in memory has them all
        # room again: the next batch goes in
        filler.unlink()
        assert complete() == 200
        wait_until(lambda: rows_in(database)[1] > 5, 15, message="a batch written after the room came back")
    check, count = rows_in(database)
    assert check == "ok" and count > 5
    assert not list(state.glob("activity.sqlite.damaged-*"))


# --- a hub pull -------------------------------------------------------------------------------
@pytest.fixture
def hub() -> Iterator[HubServer]:
    server = HubServer({REPO: Repo(commit=COMMIT, files={FILE: RepoFile(CONTENT)})})
    with server.running():
        yield server


def pull(hub: HubServer, hf_home: Path, tmp_path: Path, *, wait: bool = True
         ) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update({"HF_HOME": str(hf_home), "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1",
                "LALO_CACHE_DIR": str(tmp_path / "lalo")})
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "models", "pull", f"hf://{REPO}/{FILE}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    if wait:
        proc.wait(120)
    return proc


def storage(hf_home: Path) -> Path:
    return hf_home / "hub" / "models--org--model-GGUF"


def test_a_pull_into_a_cache_too_small_says_the_room_needed_and_leaves_no_model(
    tmp_path: Path, mount: Mount, hub: HubServer,
) -> None:
    hf_home = mount(tmp_path / "hf", 32 * MiB)
    proc = pull(hub, hf_home, tmp_path)
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 1, err
    blobs = storage(hf_home) / "blobs"
    # one line, before any byte is fetched: the room needed and the room there is, where
    assert re.fullmatch(rf"lalo: error: hf://{REPO}/{FILE}@main: not enough disk space: needs "
                        rf"24.0 MiB \(\+64.0 MiB margin\), [\d.]+ MiB free in {re.escape(str(blobs))}\n",
                        err), err
    assert not hub.cdn_gets()
    assert not (storage(hf_home) / "snapshots").exists()
    assert not blobs.exists() or not list(blobs.iterdir())

    resize(hf_home, 128 * MiB)  # room made: the same command completes and verifies
    again = pull(hub, hf_home, tmp_path)
    out = again.stdout.read() if again.stdout else ""
    assert again.returncode == 0, again.stderr.read() if again.stderr else ""
    path = storage(hf_home) / "snapshots" / COMMIT / FILE
    assert f"downloaded: {path}" in out and SHA in out
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA


def test_a_disk_that_fills_during_a_pull_keeps_the_bytes_for_a_resume_and_no_model(
    tmp_path: Path, mount: Mount, hub: HubServer,
) -> None:
    # room for the check before the download (24 MiB + the 64 MiB margin), then another
    # writer takes it while the bytes arrive
    hf_home = mount(tmp_path / "hf", 100 * MiB)
    hub.rate = 8 * MiB
    partial = storage(hf_home) / "blobs" / f"{SHA}.incomplete"
    proc = pull(hub, hf_home, tmp_path, wait=False)
    try:
        wait_until(lambda: partial.exists() and partial.stat().st_size > MiB, 60,
                   message="the download under way")
        filler = fill(hf_home)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 1, err
    kept = partial.stat().st_size
    assert 0 < kept < len(CONTENT)
    assert CONTENT.startswith(partial.read_bytes())  # what is kept is a true prefix
    blobs = partial.parent
    assert re.fullmatch(
        rf"lalo: error: hf://{REPO}/{FILE}@main: the disk filled up during the download: needs "
        rf"[\d.]+ MiB more \(\+64.0 MiB margin\), [\d.]+ (B|KiB) free in {re.escape(str(blobs))}; "
        rf"[\d.]+ MiB of 24.0 MiB kept in {re.escape(str(partial))}; once there is room, run the "
        rf"pull again to resume \(lalo models pull hf://{REPO}/{FILE}@main\)",
        err.splitlines()[-1]), err  # after the progress bar
    assert not (storage(hf_home) / "snapshots").exists() and not (blobs / SHA).exists()

    filler.unlink()
    hub.rate = None
    before = len(hub.cdn_gets())
    again = pull(hub, hf_home, tmp_path)
    assert again.returncode == 0, again.stderr.read() if again.stderr else ""
    wait_until(lambda: len(hub.cdn_gets()) > before, 10, message="the resumed transfer recorded")
    assert [get.range for get in hub.cdn_gets()[before:]] == [f"bytes={kept}-"]
    path = storage(hf_home) / "snapshots" / COMMIT / FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA and not partial.exists()


# --- packaging -----------------------------------------------------------------------------
def _bundle_spec(folder: Path, model: Path) -> Path:
    from tests.support.engine import test_engine_variant

    spec = folder / "tiny.yaml"
    spec.write_text(json.dumps({
        "name": "tiny", "targets": ["bundle"], "platforms": ["linux"],
        "models": {"beta": {"file": str(model), "license": "Apache-2.0", "ctx_size": 512}},
        "engine": {"llama_server": {"variant": test_engine_variant()}}}))
    return spec


def test_a_bundle_build_without_room_says_so_before_writing_anything(
    tmp_path: Path, mount: Mount, llama_server_bin: Path, small_model_b: Path,
) -> None:
    out = mount(tmp_path / "out", 32 * MiB)
    spec = _bundle_spec(tmp_path, small_model_b)
    done = subprocess.run([sys.executable, "-m", "launcher", "build", str(spec), "--target",
                           "bundle", "--out", str(out)], capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode != 0, done.stdout
    found = re.search(r"not enough room in (\S+): the build needs ([0-9.]+ \w+) \(the bundle "
                      r"folder [0-9.]+ \w+, its archive [0-9.]+ \w+\), ([0-9.]+ \w+) free there",
                      done.stderr)
    assert found and found.group(1) == str(out), done.stderr
    assert list(out.iterdir()) == []  # nothing written, not even a staging folder
    print(f"\nbundle on a 32 MiB disk: {found.group(0)}")


def test_a_disk_that_fills_up_during_a_bundle_build_keeps_no_half_archive(
    tmp_path: Path, mount: Mount, llama_server_bin: Path, small_model_b: Path,
) -> None:
    from launcher.errors import PackagingError
    from launcher.packaging.build import Packager
    from launcher.packaging.spec import load_spec

    out = mount(tmp_path / "out", 512 * MiB)
    spec = load_spec(str(_bundle_spec(tmp_path, small_model_b)))
    filler: list[Path] = []

    def report(line: str) -> None:
        if line.startswith("bundle: writing") and not filler:  # another writer takes the room
            filler.append(fill(out, leave=MiB))

    with pytest.raises(PackagingError) as failed:
        Packager(report=report).build(spec, out, ["bundle"])
    message = str(failed.value)
    assert message.startswith(f"the disk filled up while building in {out}"), message
    assert "No space left on device" in message and "free there now" in message, message
    names = sorted(p.name for p in out.iterdir())
    assert names == ["filler", "tiny-bundle"], names  # no archive, whole or half; no temp file
    assert (out / "tiny-bundle" / "manifest.json").is_file()  # the folder was finished first
    filler[0].unlink()  # room again: the same build completes
    result = Packager(report=lambda _line: None).build(spec, out, ["bundle"])
    assert result.bundle is not None and result.bundle.archive is not None
    assert result.bundle.archive.is_file()
    print(f"\nthe disk filled during the archive: {message}")
