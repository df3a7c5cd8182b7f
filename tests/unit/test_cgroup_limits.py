"""launcher.machine.limits and .memory on fake /proc and /sys trees: cgroup v1 and v2, limits on
an ancestor, "max" and v1's unlimited figure, CPU quotas, unreadable trees."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from launcher.machine.limits import (
    NO_LIMITS,
    CgroupLimits,
    CpuLimit,
    MemoryLimit,
    OomKills,
    oom_kills,
    read_limits,
)
from launcher.machine.memory import system_memory
from launcher.placement.planner import compute_budget

MIB = 1024**2
GIB = 1024**3
V1_UNLIMITED = "9223372036854771712"

V1_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTS = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


def v1_tree(root: Path, *, limit: str, usage: int, parent_limit: str = V1_UNLIMITED,
            inactive: int = 0, quota: str = "-1") -> Path:
    mem = "sys/fs/cgroup/memory"
    cpu = "sys/fs/cgroup/cpu,cpuacct"
    return write(root, {
        "proc/self/cgroup": "4:memory:/pod/lalo\n2:cpu,cpuacct:/pod/lalo\n0::/",
        "proc/self/mountinfo": V1_MOUNTS,
        f"{mem}/memory.limit_in_bytes": V1_UNLIMITED,
        f"{mem}/memory.usage_in_bytes": str(3 * GIB),
        f"{mem}/pod/memory.limit_in_bytes": parent_limit,
        f"{mem}/pod/memory.usage_in_bytes": str(usage + 10 * MIB),
        f"{mem}/pod/memory.stat": "total_inactive_file 0",
        f"{mem}/pod/lalo/memory.limit_in_bytes": limit,
        f"{mem}/pod/lalo/memory.usage_in_bytes": str(usage),
        f"{mem}/pod/lalo/memory.stat": f"cache 5\ninactive_file 1\ntotal_inactive_file {inactive}",
        f"{cpu}/cpu.cfs_quota_us": "-1",
        f"{cpu}/cpu.cfs_period_us": "100000",
        f"{cpu}/pod/lalo/cpu.cfs_quota_us": quota,
        f"{cpu}/pod/lalo/cpu.cfs_period_us": "100000",
    })


def v2_tree(root: Path, *, memory_max: str, parent_max: str = "max", current: int = 0,
            inactive: int = 0, cpu_max: str = "max 100000", parent_cpu: str = "max 100000") -> Path:
    base = "sys/fs/cgroup"
    return write(root, {
        "proc/self/cgroup": "0::/kubepods/pod1/lalo",
        "proc/self/mountinfo": V2_MOUNTS,
        f"{base}/memory.stat": "inactive_file 0",  # the root cgroup has no memory.max
        f"{base}/kubepods/pod1/memory.max": parent_max,
        f"{base}/kubepods/pod1/memory.current": str(current + 5 * MIB),
        f"{base}/kubepods/pod1/cpu.max": parent_cpu,
        f"{base}/kubepods/pod1/lalo/memory.max": memory_max,
        f"{base}/kubepods/pod1/lalo/memory.current": str(current),
        f"{base}/kubepods/pod1/lalo/memory.stat": f"anon 1\ninactive_file {inactive}\nactive_file 2",
        f"{base}/kubepods/pod1/lalo/cpu.max": cpu_max,
    })


def test_v1_limit_usage_less_inactive_file_and_quota(tmp_path: Path) -> None:
    root = v1_tree(tmp_path, limit=str(400 * MIB), usage=100 * MIB, inactive=30 * MIB,
                   quota="150000")
    limits = read_limits(root)
    assert limits.memory == MemoryLimit(400 * MIB, 70 * MIB, 1)
    assert limits.memory.available == 330 * MIB
    assert limits.cpu == CpuLimit(1.5, 1)
    assert limits.cpu.count == 2


def test_v1_unlimited_figure_is_no_limit(tmp_path: Path) -> None:
    limits = read_limits(v1_tree(tmp_path, limit=V1_UNLIMITED, usage=MIB))
    assert limits == NO_LIMITS


def test_v1_limit_on_an_ancestor(tmp_path: Path) -> None:
    root = v1_tree(tmp_path, limit=V1_UNLIMITED, usage=50 * MIB, parent_limit=str(GIB))
    # the ancestor's limit with the ancestor's usage (lalo's cgroup + its siblings)
    assert read_limits(root).memory == MemoryLimit(GIB, 60 * MIB, 1)


def test_v1_hierarchical_limit_of_a_hidden_ancestor(tmp_path: Path) -> None:
    root = v1_tree(tmp_path, limit=V1_UNLIMITED, usage=50 * MIB)
    write(root, {"sys/fs/cgroup/memory/pod/lalo/memory.stat":
                 f"total_inactive_file {10 * MIB}\nhierarchical_memory_limit {512 * MIB}"})
    assert read_limits(root).memory == MemoryLimit(512 * MIB, 40 * MIB, 1)


def test_v1_inside_a_container_mount_root(tmp_path: Path) -> None:
    """Docker without a cgroup namespace: the mount's root is the container's cgroup."""
    write(tmp_path, {
        "proc/self/cgroup": "9:memory:/docker/abc",
        "proc/self/mountinfo": "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": str(256 * MIB),
        "sys/fs/cgroup/memory/memory.usage_in_bytes": str(16 * MIB),
    })
    assert read_limits(tmp_path).memory == MemoryLimit(256 * MIB, 16 * MIB, 1)


def test_v2_limit_and_cpu_max(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, memory_max=str(400 * MIB), current=120 * MIB, inactive=20 * MIB,
                   cpu_max="200000 100000")
    limits = read_limits(root)
    assert limits.memory == MemoryLimit(400 * MIB, 100 * MIB, 2)
    assert limits.cpu == CpuLimit(2.0, 2)


def test_v2_max_everywhere_is_no_limit(tmp_path: Path) -> None:
    assert read_limits(v2_tree(tmp_path, memory_max="max")) == NO_LIMITS


def test_v2_smallest_limit_on_the_path_wins(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, memory_max="max", parent_max=str(300 * MIB), current=100 * MIB,
                   cpu_max="400000 100000", parent_cpu="50000 100000")
    limits = read_limits(root)
    assert limits.memory == MemoryLimit(300 * MIB, 105 * MIB, 2)
    assert limits.cpu == CpuLimit(0.5, 2)
    assert limits.cpu.count == 1


def test_v2_tighter_room_wins_over_the_smaller_limit(tmp_path: Path) -> None:
    """A 1 GiB pod nearly full bounds lalo more than its own cgroup's 900 MiB."""
    root = v2_tree(tmp_path, memory_max=str(900 * MIB), parent_max=str(GIB), current=10 * MIB)
    write(root, {"sys/fs/cgroup/kubepods/pod1/memory.current": str(GIB - 50 * MIB)})
    assert read_limits(root).memory == MemoryLimit(GIB, GIB - 50 * MIB, 2)


def test_namespaced_v2_reads_the_mount_itself(tmp_path: Path) -> None:
    write(tmp_path, {
        "proc/self/cgroup": "0::/",
        "proc/self/mountinfo": V2_MOUNTS,
        "sys/fs/cgroup/memory.max": str(2 * GIB),
        "sys/fs/cgroup/memory.current": str(GIB),
        "sys/fs/cgroup/cpu.max": "max 100000",
    })
    assert read_limits(tmp_path) == CgroupLimits(MemoryLimit(2 * GIB, GIB, 2), None)


def test_unreadable_or_odd_trees_are_no_limit(tmp_path: Path) -> None:
    assert read_limits(tmp_path) == NO_LIMITS  # no /proc at all
    root = v2_tree(tmp_path / "odd", memory_max="lots", cpu_max="")
    assert read_limits(root) == NO_LIMITS


def test_oom_kills_of_lalos_own_cgroup_v1_and_v2(tmp_path: Path) -> None:
    v1 = v1_tree(tmp_path / "v1", limit=str(400 * MIB), usage=100 * MIB)
    assert oom_kills(v1) is None  # no memory.oom_control: nobody can tell
    write(v1, {"sys/fs/cgroup/memory/pod/lalo/memory.oom_control":
               "oom_kill_disable 0\nunder_oom 0\noom_kill 2"})
    assert oom_kills(v1) == OomKills(2, 400 * MIB)
    v2 = v2_tree(tmp_path / "v2", memory_max="max")
    write(v2, {"sys/fs/cgroup/kubepods/pod1/lalo/memory.events":
               "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0"})
    assert oom_kills(v2) == OomKills(1, None)  # killed, but under no container limit
    assert oom_kills(tmp_path / "nothing") is None


def host(total: int, available: int) -> SimpleNamespace:
    return SimpleNamespace(total=total, available=available)


def test_system_memory_uses_a_limit_below_the_host() -> None:
    limit = MemoryLimit(400 * MIB, 150 * MIB, 1)
    memory = system_memory(lambda: CgroupLimits(limit), lambda: host(24 * GIB, 20 * GIB))
    assert (memory.total, memory.available) == (400 * MIB, 250 * MIB)
    assert memory.limit_note() == "memory limit of this container: 400 MiB (cgroup v1)"
    budget = compute_budget("auto", 64 * MIB, memory.available, memory.limit_note())
    assert budget.bytes == 186 * MIB
    assert budget.source.endswith("; memory limit of this container: 400 MiB (cgroup v1)")


def test_system_memory_never_above_the_host_available() -> None:
    limit = MemoryLimit(8 * GIB, GIB, 2)
    memory = system_memory(lambda: CgroupLimits(limit), lambda: host(16 * GIB, 3 * GIB))
    assert (memory.total, memory.available) == (8 * GIB, 3 * GIB)


def test_system_memory_ignores_a_limit_above_the_host() -> None:
    limit = MemoryLimit(64 * GIB, GIB, 2)
    memory = system_memory(lambda: CgroupLimits(limit), lambda: host(16 * GIB, 10 * GIB))
    assert (memory.total, memory.available, memory.limit) == (16 * GIB, 10 * GIB, None)
    assert memory.limit_note() is None
