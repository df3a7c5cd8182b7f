"""How big a lalo pod must be: memory from lalo's own estimate of each model (the figure the
planner reserves, within about 1 % of measured RSS) plus lalo itself, CPU from the models'
threads, and the RAM budget lalo must keep to inside the pod. Pure functions.

lalo inside the pod reads the pod's limit as its machine's RAM (launcher.machine.limits), and
the generated config carries the budget the limit leaves for models: `auto` would start from
what is free under the limit now less the 1 GiB default reserve, meant for a whole machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from launcher.config import Config, ModelConfig
from launcher.models.shape import MIB, ModelFacts
from launcher.placement.estimate import MemorySettings, estimate_for, repack_types_for

# lalo's own process (proxy, supervisor, dashboard): 46 MiB RSS measured under load here,
# rounded up for the allocator's growth over a long run.
LALO_OWN_MEMORY = 60 * MIB
# A liveness probe is a second, short-lived lalo process in the same cgroup (exec probe).
PROBE_MEMORY = 40 * MIB
LALO_OWN_MILLICPUS = 100
GIB = 1024**3
# Nodes are x86-64 servers: the largest figure among their CPUs (AVX-512 repacks Q2_K too).
NODE_REPACK_TYPES = repack_types_for("x86_64", {"avx2", "avx512f"})


@dataclass(frozen=True)
class ModelSize:
    name: str
    memory: int  # bytes: lalo's estimate of llama-server serving it with its settings
    preload: bool
    cpus: int  # threads it computes with (requested as whole CPUs)
    file_size: int


@dataclass(frozen=True)
class PodSize:
    models: tuple[ModelSize, ...]
    memory_request: int  # bytes: lalo + the models `lalo up` preloads
    memory_limit: int  # bytes: lalo + a probe + every model lalo may hold at once
    ram_budget: int  # bytes: what the limit leaves lalo's planner for models
    millicpus: int
    storage: int  # bytes: the models volume

    def annotation(self) -> str:
        """`name=bytes` per model and lalo's own share: how the request was reached."""
        parts = [f"{m.name}={m.memory}" for m in self.models if m.preload]
        return ",".join([*parts, f"lalo={LALO_OWN_MEMORY}"])


def model_memory(facts: ModelFacts, model: ModelConfig) -> int:
    """lalo's estimate for one model as a node would run it (its kv_cache and args included)."""
    return estimate_for(facts, MemorySettings.of(model), NODE_REPACK_TYPES).total


def size_pod(
    config: Config,
    facts: Mapping[str, ModelFacts],
    file_sizes: Mapping[str, int],
    *,
    cpus_per_auto_model: int,
    storage: int | None = None,
) -> PodSize:
    """Requests and limits for a pod running `config`'s models (facts and file sizes by name).

    Request: what `lalo up` starts at once (the preload models) plus lalo. Limit: the most
    lalo may hold: every model, or the `max_loaded` largest, or lalo's own `ram_budget` when
    the config sets one (never below the request). CPU: the preload models' threads.
    """
    sizes = []
    for name, model in config.models.items():
        sizes.append(ModelSize(
            name=name,
            memory=model_memory(facts[name], model),
            preload=model.preload,
            cpus=model.thread_count or cpus_per_auto_model,
            file_size=file_sizes[name],
        ))
    preload = sum(m.memory for m in sizes if m.preload)
    budget = config.resources.ram_budget
    if isinstance(budget, int):
        models_limit = max(preload, budget)
    else:
        models_limit = max(preload, _largest(sizes, config.resources.max_loaded))
    request = LALO_OWN_MEMORY + preload
    limit = LALO_OWN_MEMORY + PROBE_MEMORY + models_limit
    busy = [m.cpus for m in sizes if m.preload] or [max(m.cpus for m in sizes)]
    millicpus = LALO_OWN_MILLICPUS + 1000 * sum(busy)
    files = sum(file_sizes.values())
    volume = storage if storage is not None else max(GIB, math.ceil(files * 1.25 / GIB) * GIB)
    return PodSize(
        models=tuple(sizes), memory_request=request, memory_limit=limit,
        ram_budget=models_limit, millicpus=millicpus, storage=volume,
    )


def _largest(sizes: Sequence[ModelSize], max_loaded: int) -> int:
    ordered = sorted((m.memory for m in sizes), reverse=True)
    return sum(ordered[:max_loaded] if max_loaded else ordered)


def mebibytes(size: int) -> str:
    """A Kubernetes memory quantity, rounded up to whole MiB (`1234Mi`)."""
    return f"{math.ceil(size / MIB)}Mi"


def gibibytes(size: int) -> str:
    return f"{math.ceil(size / GIB)}Gi"


def millicpus(value: int) -> str:
    return f"{value}m" if value % 1000 else str(value // 1000)
