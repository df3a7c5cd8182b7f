"""The memory limit and CPU quota of lalo's own cgroup (a container's, a Kubernetes pod's).

Read from /proc/self/cgroup and /proc/self/mountinfo, then the cgroup files (v2: memory.max,
memory.current, cpu.max; v1: memory.limit_in_bytes, memory.usage_in_bytes, cpu.cfs_quota_us)
of lalo's cgroup and its ancestors, the smallest figure on the path winning; and how many of
its processes the kernel killed for memory (`oom_kills`). Never raises: what cannot be read is
no limit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# cgroup v1 writes "no limit" as the largest page-aligned 64-bit count (9223372036854771712);
# anything this large is no limit.
UNLIMITED = 1 << 62


@dataclass(frozen=True)
class MemoryLimit:
    """The tightest memory limit on lalo's cgroup path and what is left under it."""

    limit: int  # bytes
    used: int  # bytes the limited cgroup uses, less its reclaimable page cache
    version: int  # 1 or 2

    @property
    def available(self) -> int:
        return max(0, self.limit - self.used)


@dataclass(frozen=True)
class CpuLimit:
    """The tightest CFS quota on lalo's cgroup path, in CPUs (1.5: 150 ms per 100 ms)."""

    cpus: float
    version: int

    @property
    def count(self) -> int:
        """Whole CPUs (1.5 -> 2: threads beyond the quota only wait for the next period)."""
        return max(1, math.ceil(round(self.cpus, 3)))


@dataclass(frozen=True)
class CgroupLimits:
    memory: MemoryLimit | None = None
    cpu: CpuLimit | None = None


NO_LIMITS = CgroupLimits()


@dataclass(frozen=True)
class _Mount:
    root: str  # the cgroup path mounted there
    point: Path  # where, under `root_dir`
    version: int
    controllers: frozenset[str]


def read_limits(root_dir: Path = Path("/")) -> CgroupLimits:
    """lalo's cgroup limits; `root_dir` is where /proc and /sys are (tests give a fake tree)."""
    try:
        membership = _membership(root_dir)
        mounts = _mounts(root_dir)
        return CgroupLimits(memory=_memory(membership, mounts),
                            cpu=_cpu(membership, mounts))
    except (OSError, ValueError, IndexError, UnicodeError):
        return NO_LIMITS


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError):
        return None


def _membership(root_dir: Path) -> dict[str, str]:
    """controller -> cgroup path, from /proc/self/cgroup; "" is the cgroup v2 path."""
    found: dict[str, str] = {}
    text = _read(root_dir / "proc/self/cgroup") or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            found[""] = path
        for name in controllers.split(","):
            if name:
                found[name] = path
    return found


def _mounts(root_dir: Path) -> list[_Mount]:
    """cgroup file systems from /proc/self/mountinfo (fields: see proc(5))."""
    mounts = []
    for line in (_read(root_dir / "proc/self/mountinfo") or "").splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        point = root_dir / _unescape(fields[4]).lstrip("/")
        if tail[0] == "cgroup2":
            mounts.append(_Mount(_unescape(fields[3]), point, 2, frozenset()))
        else:
            names = frozenset(tail[2].split(","))
            mounts.append(_Mount(_unescape(fields[3]), point, 1, names))
    return mounts


def _unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040)."""
    for code in ("040", "011", "012", "134"):
        text = text.replace("\\" + code, chr(int(code, 8)))
    return text


def _path_dirs(mount: _Mount, cgroup: str) -> list[Path]:
    """The directories of `cgroup` and its ancestors visible under `mount`, leaf first.

    Inside a cgroup namespace /proc/self/cgroup says "/" and the mount is lalo's own cgroup;
    without one, the path is relative to the mount's root (a container's mount root is its
    own cgroup, so the path may name nothing below it)."""
    path, root = PurePosixPath(cgroup), PurePosixPath(mount.root)
    relative = path.relative_to(root) if path.is_relative_to(root) else PurePosixPath()
    leaf = mount.point.joinpath(*relative.parts)
    if not leaf.is_dir():
        leaf = mount.point
    dirs = [leaf]
    while dirs[-1] != mount.point and mount.point in dirs[-1].parents:
        dirs.append(dirs[-1].parent)
    return dirs


def _v1_mount(mounts: list[_Mount], membership: dict[str, str], controller: str) -> _Mount | None:
    if controller not in membership:
        return None
    return next((m for m in mounts if m.version == 1 and controller in m.controllers), None)


def _v2_mount(mounts: list[_Mount], membership: dict[str, str]) -> _Mount | None:
    if "" not in membership:
        return None
    return next((m for m in mounts if m.version == 2), None)


def _number(text: str | None) -> int | None:
    if text is None or text == "max":
        return None
    value = int(text)
    return None if value < 0 or value >= UNLIMITED else value


def _stat(directory: Path, key: str) -> int:
    """One `key value` line of memory.stat; 0 when absent."""
    for line in (_read(directory / "memory.stat") or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def _memory(membership: dict[str, str], mounts: list[_Mount]) -> MemoryLimit | None:
    """The cgroup on the path with the least room under its limit (v1 memory controller
    first: on a hybrid host the v2 tree has no memory controller)."""
    best: MemoryLimit | None = None
    mount = _v1_mount(mounts, membership, "memory")
    if mount is not None:
        dirs = _path_dirs(mount, membership["memory"])
        for directory in dirs:
            limit = _number(_read(directory / "memory.limit_in_bytes"))
            usage = _number(_read(directory / "memory.usage_in_bytes"))
            if limit is None or usage is None:
                continue
            used = max(0, usage - _stat(directory, "total_inactive_file"))
            best = _tighter(best, MemoryLimit(limit, used, 1))
        # the limit of an ancestor hidden from a container (above its mount) counts too
        hierarchical = _stat(dirs[0], "hierarchical_memory_limit")
        usage = _number(_read(dirs[0] / "memory.usage_in_bytes"))
        if 0 < hierarchical < UNLIMITED and usage is not None:
            used = max(0, usage - _stat(dirs[0], "total_inactive_file"))
            best = _tighter(best, MemoryLimit(hierarchical, used, 1))
        return best
    mount = _v2_mount(mounts, membership)
    if mount is None:
        return None
    for directory in _path_dirs(mount, membership[""]):
        limit = _number(_read(directory / "memory.max"))
        usage = _number(_read(directory / "memory.current"))
        if limit is None or usage is None:
            continue
        used = max(0, usage - _stat(directory, "inactive_file"))
        best = _tighter(best, MemoryLimit(limit, used, 2))
    return best


def _tighter(best: MemoryLimit | None, other: MemoryLimit) -> MemoryLimit:
    if best is None or (other.available, other.limit) < (best.available, best.limit):
        return other
    return best


def _cpu(membership: dict[str, str], mounts: list[_Mount]) -> CpuLimit | None:
    quotas: list[CpuLimit] = []
    mount = _v1_mount(mounts, membership, "cpu")
    if mount is not None:
        for directory in _path_dirs(mount, membership["cpu"]):
            quota = _number(_read(directory / "cpu.cfs_quota_us"))
            period = _number(_read(directory / "cpu.cfs_period_us"))
            if quota and period:
                quotas.append(CpuLimit(quota / period, 1))
    elif (mount := _v2_mount(mounts, membership)) is not None:
        for directory in _path_dirs(mount, membership[""]):
            words = (_read(directory / "cpu.max") or "max").split()
            quota = _number(words[0])
            period = _number(words[1]) if len(words) > 1 else 100_000
            if quota and period:
                quotas.append(CpuLimit(quota / period, 2))
    return min(quotas, key=lambda limit: limit.cpus, default=None)


@dataclass(frozen=True)
class OomKills:
    """How many processes of lalo's cgroup (its model servers live there too) the kernel has
    killed for memory so far, and the memory limit over them (None: only the machine's)."""

    count: int
    limit: int | None


def oom_kills(root_dir: Path = Path("/")) -> OomKills | None:
    """`oom_kill` of v1's memory.oom_control or v2's memory.events in lalo's own cgroup;
    None where there is no memory cgroup to read (then nobody can tell)."""
    try:
        membership = _membership(root_dir)
        mounts = _mounts(root_dir)
        mount = _v1_mount(mounts, membership, "memory")
        if mount is not None:
            directory, name = _path_dirs(mount, membership["memory"])[0], "memory.oom_control"
        elif (mount := _v2_mount(mounts, membership)) is not None:
            directory, name = _path_dirs(mount, membership[""])[0], "memory.events"
        else:
            return None
        for line in (_read(directory / name) or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                limit = _memory(membership, mounts)
                return OomKills(int(value), limit.limit if limit is not None else None)
    except (OSError, ValueError, IndexError, UnicodeError):
        pass
    return None


def current_oom_kills() -> OomKills | None:
    """`oom_kills()` on Linux; None elsewhere."""
    if not os.path.exists("/proc/self/cgroup"):
        return None
    return oom_kills()


def current_limits() -> CgroupLimits:
    """This process's limits on Linux; none elsewhere."""
    if not os.path.exists("/proc/self/cgroup"):
        return NO_LIMITS
    return read_limits()
