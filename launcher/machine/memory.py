"""The RAM lalo may use: the host's, or its container's memory limit when that is smaller.

Inside a memory cgroup the limit is the machine: total = the limit, available = the limit less
what the cgroup uses (less its reclaimable page cache, as container runtimes count it), never
more than the host has free. Every RAM figure lalo plans with comes from `system_memory`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import psutil

from launcher.machine.limits import CgroupLimits, MemoryLimit, current_limits
from launcher.units import format_size


class _VirtualMemory(Protocol):
    @property
    def total(self) -> int: ...

    @property
    def available(self) -> int: ...


@dataclass(frozen=True)
class SystemMemory:
    total: int  # bytes
    available: int
    host_total: int
    host_available: int
    limit: MemoryLimit | None = None  # the container's limit, when it is below the host's RAM

    def limit_note(self) -> str | None:
        """`memory limit of this container: 400 MiB (cgroup v1)`, or None without one."""
        if self.limit is None:
            return None
        return (f"memory limit of this container: {format_size(self.limit.limit)} "
                f"(cgroup v{self.limit.version})")

    def to_json(self) -> dict[str, object]:
        return {"total": self.total, "available": self.available,
                "host_total": self.host_total, "host_available": self.host_available,
                "cgroup_limit": self.limit.limit if self.limit else None,
                "cgroup_used": self.limit.used if self.limit else None,
                "cgroup_version": self.limit.version if self.limit else None}


def system_memory(
    limits: Callable[[], CgroupLimits] = current_limits,
    host: Callable[[], _VirtualMemory] = psutil.virtual_memory,
) -> SystemMemory:
    """This machine's RAM as lalo may use it now (read afresh on each call)."""
    memory = host()
    total, available = int(memory.total), int(memory.available)
    limit = limits().memory
    if limit is None or limit.limit >= total:
        return SystemMemory(total, available, total, available)
    return SystemMemory(limit.limit, min(limit.available, available), total, available, limit)


def available_memory() -> int:
    """The RAM `ram_budget: auto` starts from, now."""
    return system_memory().available


def total_memory() -> int:
    """This machine's RAM, or its container's memory limit when smaller."""
    return system_memory().total
