"""The container's limit is the machine: the real `lalo plan` and `lalo up` started inside a
real memory cgroup of 400 MiB (a child of this process's own, cgroup v1 or v2) plan against
the limit, and a model that cannot fit under it is neither planned nor started (503)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.lalo import FAST_SUPERVISOR, LaloUp, lalo_env, wait_until, write_config

pytestmark = pytest.mark.integration

MIB = 1024**2
LIMIT = 400 * MIB
NOTE_V1 = "memory limit of this container: 400 MiB (cgroup v1)"


@dataclass(frozen=True)
class MemoryCgroup:
    path: Path
    version: int

    def prefix(self) -> list[str]:
        """argv that moves itself into the cgroup, then runs the rest (`exec`: same pid)."""
        procs = self.path / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh"]

    def note(self) -> str:
        return f"memory limit of this container: 400 MiB (cgroup v{self.version})"


def _own_memory_cgroup() -> tuple[Path, int] | None:
    """This process's memory cgroup directory, from /proc/self/cgroup and mountinfo."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    paths = {c: p for _, cs, p in (line.split(":", 2) for line in lines) for c in cs.split(",")}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        root, point = fields.split()[3:5]
        kind, _, options = tail.split()[:3]
        if kind == "cgroup" and "memory" in options.split(",") and "memory" in paths:
            return Path(point) / os.path.relpath(paths["memory"], root), 1
        if kind == "cgroup2" and "" in paths and "memory" not in paths:
            own = Path(point) / os.path.relpath(paths[""], root)
            if "memory" in (own / "cgroup.subtree_control").read_text().split():
                return own, 2
    return None


@pytest.fixture
def memory_cgroup() -> Iterator[MemoryCgroup]:
    """A child cgroup of 400 MiB; removed after (its processes have exited by then)."""
    if sys.platform != "linux":
        pytest.skip("memory cgroups are Linux's")
    found = _own_memory_cgroup()
    if found is None:
        pytest.skip("no cgroup v1 memory controller, nor a v2 cgroup delegating memory, here")
    parent, version = found
    child = parent / f"lalo-test-{uuid.uuid4().hex[:8]}"
    try:
        child.mkdir()
        name = "memory.limit_in_bytes" if version == 1 else "memory.max"
        (child / name).write_text(str(LIMIT))
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup under {parent}: {exc}")
    try:
        yield MemoryCgroup(child, version)
    finally:
        def empty() -> bool:
            return not (child / "cgroup.procs").read_text().split()

        wait_until(empty, 30, message=f"{child} to have no process left")
        deadline = time.monotonic() + 10
        while True:  # the kernel may still be freeing the last task's memory
            try:
                child.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def test_plan_inside_a_400_mib_cgroup(memory_cgroup: MemoryCgroup, tmp_path: Path,
                                      llama_server_bin: Path, smollm2: Path, gemma3: Path) -> None:
    config = write_config(
        tmp_path / "lalo.yaml",
        {"smol": {"file": str(smollm2), "ctx_size": 2048},
         "gemma": {"file": str(gemma3), "ctx_size": 2048}},
        resources={"ram_reserve": 32 * MIB},
        engines={"llama_server": {"path": str(llama_server_bin)}})
    done = subprocess.run(
        [*memory_cgroup.prefix(), sys.executable, "-m", "launcher", "plan", "--json",
         "--config", str(config)],
        env=lalo_env(tmp_path / "state", tmp_path / "config"), capture_output=True, text=True,
        timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    budget, source = plan["budget"], plan["budget_source"]
    # the budget is the limit less what lalo plan itself uses and the reserve: never the host's
    assert LIMIT - 200 * MIB < budget <= LIMIT - 32 * MIB, source
    assert source.endswith(memory_cgroup.note()), source
    actions = {d["name"]: (d["action"], d["required"]) for d in plan["models"]}
    assert actions["smol"][0] == "start", actions
    assert actions["gemma"][0] == "cannot-fit" and actions["gemma"][1] > budget, actions
    print(f"\nlalo plan inside the 400 MiB cgroup: budget {budget} ({source}); {actions}")


def test_up_inside_a_400_mib_cgroup(memory_cgroup: MemoryCgroup, tmp_path: Path,
                                    llama_server_bin: Path, smollm2: Path, gemma3: Path) -> None:
    config = write_config(
        tmp_path / "lalo.yaml",
        {"smol": {"file": str(smollm2), "ctx_size": 2048},
         "gemma": {"file": str(gemma3), "ctx_size": 2048, "preload": False}},
        resources={"ram_reserve": 32 * MIB},
        engines={"llama_server": {"path": str(llama_server_bin)}})
    env = lalo_env(tmp_path / "state", tmp_path / "config")
    with LaloUp(config, env, prefix=memory_cgroup.prefix()) as up:
        up.wait_state("smol", "ready", timeout=120)
        ram = up.status()["ram"]
        assert ram["total"] == LIMIT and ram["cgroup_limit"] == LIMIT, ram
        assert ram["available"] <= LIMIT - ram["cgroup_used"], ram
        assert ram["budget"] <= LIMIT - 32 * MIB and ram["budget_source"].endswith(memory_cgroup.note()), ram
        pids = {int(p) for p in (memory_cgroup.path / "cgroup.procs").read_text().split()}
        assert up.proc is not None and up.proc.pid in pids  # lalo and its server are inside
        assert any(child.pid in pids for child in up.children())
        reply = httpx.post(up.url + "/v1/chat/completions", timeout=60, json={
            "model": "gemma", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["code"] == "insufficient_memory", reply.text
        assert "MiB" in reply.json()["error"]["message"], reply.text  # with the figures
        assert up.model("gemma")["state"] != "ready"
        assert up.model("smol")["state"] == "ready"
        print(f"\ninside the 400 MiB cgroup: {ram}\ngemma: {reply.json()['error']['message']}")


# Takes `want` bytes in 8 MiB steps (each page written, so the cgroup is charged; a pause
# between steps lets a killed process's memory be freed before the next), says "held", then
# holds them until its stdin closes.
HOG = """
import sys, time
want, held = int(sys.argv[1]), []
while sum(map(len, held)) < want:
    held.append(bytearray(b"x") * (8 << 20))
    time.sleep(0.02)
print("held", flush=True)
sys.stdin.read()
"""


def anon(pid: int) -> int:
    """A process's anonymous resident memory (always charged to its own cgroup)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon for {pid}")


def test_a_real_oom_kill_by_the_cgroup_limit_is_named_and_not_looped(
        memory_cgroup: MemoryCgroup, tmp_path: Path, llama_server_bin: Path,
        smollm2: Path) -> None:
    """The kernel's own out-of-memory killer, not a test's `kill -9`: a program in lalo's
    400 MiB cgroup takes the memory the model server holds, the kernel kills the server (made
    its first choice with oom_score_adj, as a big model is), and lalo names the container's
    limit with the RSS the server had reached, raises its need and does not restart it into
    memory that is not there; once the program has gone, a request loads it again."""
    config = write_config(
        # weights read into the server's own memory (not a file mapping whose pages may be
        # charged to another cgroup): killing it frees what the program below needs
        tmp_path / "lalo.yaml", {"smol": {"file": str(smollm2), "ctx_size": 2048,
                                          "args": ["--load-mode", "none"]}},
        resources={"ram_reserve": 32 * MIB},
        supervisor=FAST_SUPERVISOR,
        engines={"llama_server": {"path": str(llama_server_bin)}})
    env = lalo_env(tmp_path / "state", tmp_path / "config")
    with LaloUp(config, env, prefix=memory_cgroup.prefix()) as up:
        assert up.proc is not None
        for _ in range(3):
            ready = up.wait_state("smol", "ready", timeout=120)
            wait_until(lambda r=ready: up.model("smol")["ram_measured"] and
                       up.model("smol")["pid"] == r["pid"], 30, message="a first RSS sample")
            loads = ready["loads"]
            Path(f"/proc/{ready['pid']}/oom_score_adj").write_text("1000")
            lalo_anon, server_anon = anon(up.proc.pid), anon(ready["pid"])
            # more than is left under the limit with the server there, less than without it
            # (the program's own interpreter takes ~10 MiB; page cache is reclaimed first)
            take = LIMIT - lalo_anon - server_anon // 2 - 24 * MIB
            hog = subprocess.Popen(
                [*memory_cgroup.prefix(), sys.executable, "-c", HOG, str(take)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert hog.stdout is not None
            if hog.stdout.readline().strip() == "held":
                break
            # the kernel killed the server and then, its memory not yet freed, the program
            # too (a few ms apart, in dmesg): start the server again (an explicit restart,
            # so these kills do not count toward max_failures) and try again
            hog.communicate(timeout=30)
            wait_until(lambda r=ready: up.model("smol")["pid"] != r["pid"]
                       or up.model("smol")["last_exit"], 30, message="the kill seen")
            httpx.post(up.url + "/api/models/smol/restart", timeout=60)
        else:
            raise AssertionError("the kernel killed the program every time, not only the server")
        try:
            row = wait_until(lambda: (m := up.model("smol"))["last_exit"] and
                             m["pid"] != ready["pid"] and m, 30,
                             message="lalo to see the server gone")
            assert "killed by the memory limit of this container (400 MiB)" in row["last_exit"], row
            assert "it had reached" in row["last_exit"] and row["memory_reached"] > 100 * MIB, row
            assert row["ram_measured"] >= row["memory_reached"] * 0.99, row  # need raised
            time.sleep(3)  # ten health intervals: no restart into memory that is not there
            row = up.model("smol")
            assert row["state"] != "ready" and row["loads"] == loads, row
            assert not [c for c in up.children() if "llama-server" in c.name()], row
            assert "killed by the memory limit of this container" in up.output()
        finally:
            hog.communicate(timeout=30)  # closes its stdin: it exits and frees its memory
        reply = httpx.post(up.url + "/v1/chat/completions", timeout=120, json={
            "model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        assert up.model("smol")["loads"] == loads + 1
        print(f"\nthe kernel's OOM kill, as lalo names it: {row['last_exit']}")
