"""How many compute threads each model server gets now, from which servers are busy: pure.

llama.cpp's threads meet at a barrier after every step of a graph. On a CPU box running several
models, a fixed `--threads` trades one case for another: threads for every CPU are fastest for
a server busy alone and ruin two servers busy at once; fewer threads waste the CPUs when one is
alone (docs/cpu-sharing.md). lalo's engine carries a route that changes a running server's
threads between decode steps (patch 0002), so lalo chooses them from what is busy:

- the CPUs lalo may use (affinity, a container's quota) less those other programs keep busy
  are split among the busy servers, a server busy alone getting all of them;
- an idle server holds the share it would get if it became busy now, so a request that
  arrives never oversubscribes the CPUs, while the busy ones are lowered at their next step;
- threads never exceed the CPUs, so servers keep OpenMP's default spin (the fastest).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadShare:
    threads: Mapping[str, int]  # per governed server
    cpus: int  # what lalo may use
    others: int  # CPUs other programs keep busy, counted out
    busy: tuple[str, ...]

    def describe(self) -> str:
        free = self.cpus - self.others
        busy = ", ".join(f"{n} {self.threads[n]}" for n in self.busy) or "none"
        others = f" ({self.others} busy with other programs)" if self.others else ""
        return f"{free} of {self.cpus} CPUs{others}; busy: {busy}"


def share_threads(servers: Sequence[str], busy: Sequence[str], cpus: int,
                  others_busy: float = 0.0) -> ThreadShare:
    """Threads for each server in `servers` (in order) when `busy` of them compute."""
    others = min(max(0, round(others_busy)), max(0, cpus - 1))
    free = max(1, cpus - others)
    working = [name for name in servers if name in set(busy)]
    shares = _split(free, len(working)) if working else []
    threads = dict(zip(working, shares, strict=True))
    ready = max(1, free // (len(working) + 1))  # what an idle one would get, busy next
    for name in servers:
        threads.setdefault(name, ready)
    return ThreadShare(threads, cpus, others, tuple(working))


def _split(cpus: int, parts: int) -> list[int]:
    """`cpus` in `parts` near-equal whole shares (at least one each), the larger ones first."""
    base, extra = divmod(cpus, parts)
    return [max(1, base + (1 if index < extra else 0)) for index in range(parts)]
