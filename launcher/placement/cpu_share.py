"""How the model servers of one lalo share the CPU: how their OpenMP threads wait.

llama.cpp's CPU backend, as built here and by default, runs each graph on an OpenMP team and
waits at an OpenMP barrier after every step. GNU libgomp, unless told otherwise, spins at
such a barrier (up to 300,000 rounds) before it sleeps. That is the fastest choice for one
server alone on the machine. When several servers compute at once on fewer CPUs than they
have threads, a thread spins for a peer that the scheduler has put off the CPU, and each
barrier costs a time slice. Measured here (docs/cpu-sharing.md, 2 CPUs, 350M servers with 2
threads each, decode tokens/s, one run): two at once decode at 0.4-5.4 each with the default
spin against 13.1-13.5 with `OMP_WAIT_POLICY=PASSIVE`, which sleeps at once but costs a server
alone 27 %. A bounded spin, `GOMP_SPINCOUNT=300`, keeps 0.96-0.98x of PASSIVE shared and
costs a server alone 12-14 % instead.

So when the models of a config may compute at once on too few CPUs, lalo starts their servers
with `GOMP_SPINCOUNT=300` (GNU libgomp, which llama.cpp built with gcc uses) and
`OMP_WAIT_POLICY=PASSIVE` (for other OpenMP runtimes, which ignore GOMP_*; libgomp lets the
spin count win). It never overrides a wait setting the user gave (lalo's environment or the
model's `env:`). A single server keeps the engine's default. No fixed setting keeps both a
server alone at the spin's speed and shared servers at PASSIVE's: only threads chosen from
what is busy do, and llama-server takes `--threads` at start only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from launcher.machine.limits import CgroupLimits, current_limits

if TYPE_CHECKING:
    from launcher.placement.resolve import ResolvedModel

WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "KMP_LIBRARY")
"""Variables that set how OpenMP threads wait (standard, GNU libgomp, LLVM libomp)."""

SHARED_WAIT = {"GOMP_SPINCOUNT": "300", "OMP_WAIT_POLICY": "PASSIVE"}
"""What servers that share too few CPUs get (see the module's docstring)."""
SHARED_WAIT_TEXT = " ".join(f"{name}={value}" for name, value in SHARED_WAIT.items())


@dataclass(frozen=True)
class CpuShare:
    """The model servers that may run at once, the compute threads they have, the CPUs."""

    servers: int
    threads: int
    cpus: int

    @property
    def oversubscribed(self) -> bool:
        """More than one server may compute at once, with more threads than CPUs."""
        return self.servers > 1 and self.threads > self.cpus

    def describe(self) -> str:
        return (f"{self.servers} model server{'s' if self.servers != 1 else ''} with "
                f"{self.threads} compute threads on {self.cpus} CPU{'s' if self.cpus != 1 else ''}")


def usable_cpus(limits: CgroupLimits | None = None) -> int:
    """CPUs this process may run on: its affinity mask (a container's cpuset), no more than
    its cgroup's CPU quota allows (a pod's `limits.cpu`)."""
    if hasattr(os, "sched_getaffinity"):
        cpus = max(1, len(os.sched_getaffinity(0)))
    else:
        cpus = os.cpu_count() or 1
    quota = (limits if limits is not None else current_limits()).cpu
    return min(cpus, quota.count) if quota is not None else cpus


def default_threads(limits: CgroupLimits | None = None) -> int:
    """The compute threads a model with `threads: auto` gets: llama.cpp's own choice, one per
    physical core, bounded by the cgroup's CPU quota (`quota_threads`)."""
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    bound = quota_threads(limits)
    return min(cores, bound) if bound is not None else cores


def quota_threads(limits: CgroupLimits | None = None) -> int | None:
    """`--threads` for a model with `threads: auto` under a CPU quota (whole CPUs, rounded
    up): llama.cpp alone would start one thread per physical core of the node, and the
    threads beyond the quota only wait for the next CFS period. None without a quota."""
    quota = (limits if limits is not None else current_limits()).cpu
    if quota is None:
        return None
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return quota.count if quota.count < cores else None


def cpu_share(threads: Sequence[int | None], max_loaded: int = 0, *,
              cpus: int | None = None, engine_default: int | None = None) -> CpuShare:
    """The share for models with these `threads` settings (None: the engine's default), of
    which at most `max_loaded` run at once (0: no cap). The busiest ones are assumed loaded."""
    fallback = engine_default if engine_default is not None else default_threads()
    counts = sorted((count or fallback for count in threads), reverse=True)
    if max_loaded > 0:
        counts = counts[:max_loaded]
    return CpuShare(servers=len(counts), threads=sum(counts),
                    cpus=cpus if cpus is not None else usable_cpus())


def config_share(models: Sequence[ResolvedModel], max_loaded: int) -> CpuShare:
    """The share of a config's models (one whose file is unusable never runs)."""
    return cpu_share([m.config.thread_count for m in models if m.error is None], max_loaded)


def user_chose_wait(*environments: Mapping[str, str]) -> str | None:
    """The first OpenMP wait setting in these environments, as `NAME=value`, or None."""
    for environment in environments:
        for name in WAIT_SETTINGS:
            if name in environment:
                return f"{name}={environment[name]}"
    return None


def policy_line(share: CpuShare, environ: Mapping[str, str] | None = None) -> str:
    """One line for `lalo plan` and `lalo up`: the share and what lalo does about it."""
    text = share.describe()
    if not share.oversubscribed:
        return text
    chosen = user_chose_wait(os.environ if environ is None else environ)
    if chosen is not None:
        return f"{text}; OpenMP wait left as lalo's environment sets it ({chosen})"
    return (f"{text}; their OpenMP threads spin briefly, then sleep, while they wait "
            f"({SHARED_WAIT_TEXT}) unless a model's env sets how they wait")


def to_json(share: CpuShare, environ: Mapping[str, str] | None = None) -> dict[str, object]:
    chosen = user_chose_wait(os.environ if environ is None else environ)
    return {
        "servers": share.servers, "threads": share.threads, "cpus": share.cpus,
        "oversubscribed": share.oversubscribed,
        "openmp_wait": (SHARED_WAIT_TEXT if share.oversubscribed and chosen is None else None),
    }


def wait_env(share: CpuShare, model_env: Mapping[str, str],
             environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What to add to one server's environment: SHARED_WAIT when `share` is oversubscribed and
    neither lalo's environment nor the model's `env:` already says how OpenMP should wait."""
    if not share.oversubscribed:
        return {}
    if user_chose_wait(model_env, os.environ if environ is None else environ) is not None:
        return {}
    return dict(SHARED_WAIT)
