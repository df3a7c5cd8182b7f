"""Which layers of which model go to which GPU, and what stays in RAM: a pure planner.

Models are placed in config order (preload models first), each on the GPUs' VRAM left by the
ones before it: whole on the one GPU with the most room if it fits there, else whole across
several GPUs (`--tensor-split` in proportion to their room), else as many layers as fit (the
last layers first, as llama.cpp offloads them) with the rest in RAM. Sizes come from
`gpu_split.split_memory`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from launcher.models.shape import MIB, ModelFacts
from launcher.placement.estimate import MemorySettings
from launcher.placement.gpu_split import OffloadSplit, split_for
from launcher.units import format_size

# Room kept free on every GPU (llama-server's own --fit keeps 1024 MiB by default; lalo's
# estimate already counts the CUDA context, so less is needed for fragmentation and drivers).
VRAM_RESERVE = 512 * MIB


@dataclass(frozen=True)
class Gpu:
    name: str
    vram: int  # bytes lalo may use on it (free VRAM, or the size given to `plan --gpu`)


@dataclass(frozen=True)
class GpuModel:
    name: str
    facts: ModelFacts
    ctx_size: int
    parallel: int = 1
    preload: bool = True
    settings: MemorySettings | None = None  # the model's own (kv_cache, args); None: f16, defaults

    @property
    def memory(self) -> MemorySettings:
        return self.settings or MemorySettings(self.ctx_size, self.parallel)


@dataclass(frozen=True)
class Placement:
    name: str
    split: OffloadSplit
    gpus: tuple[int, ...]  # indexes of the GPUs it uses, in tensor-split order
    fits: bool  # False: not even the RAM part fits the RAM left
    reason: str
    n_gpus: int = 1  # GPUs in the machine: the tensor split names each of them


    @property
    def gpu_layers(self) -> int:
        return self.split.gpu_layers

    @property
    def tensor_split(self) -> tuple[float, ...]:
        """llama-server's --tensor-split over all the machine's GPUs (0 for those not used);
        empty on a one-GPU machine."""
        if self.n_gpus <= 1 or not self.gpus:
            return ()
        shares = [0.0] * self.n_gpus
        for index, share in zip(self.gpus, self.split.tensor_split, strict=True):
            shares[index] = share
        return tuple(shares)

    @property
    def split_layers_total(self) -> int:
        return sum(d.layers + d.output for d in self.split.devices)

    def server_args(self) -> list[str]:
        """The llama-server flags for this placement (lalo passes its own choice, see docs/gpu.md)."""
        if not self.gpus:
            return ["--n-gpu-layers", "0"]
        args = ["--n-gpu-layers", str(self.gpu_layers)]
        if self.tensor_split:
            args += ["--tensor-split", ",".join(f"{share:g}" for share in self.tensor_split)]
        return args

    def to_json(self, gpus: Sequence[Gpu]) -> dict[str, object]:
        return {
            "name": self.name,
            "fits": self.fits,
            "gpu_layers": self.gpu_layers,
            "layers_total": self.split_layers_total,
            "tensor_split": list(self.tensor_split),
            "devices": [{"gpu": index, "name": gpus[index].name, **share.as_dict()}
                        for index, share in zip(self.gpus, self.split.devices, strict=True)
                        if share.total],
            "vram": self.split.vram,
            "ram": self.split.ram.total,
            "args": self.server_args(),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class GpuPlan:
    gpus: tuple[Gpu, ...]
    ram_budget: int
    placements: tuple[Placement, ...]

    def vram_left(self) -> list[int]:
        left = [gpu.vram - VRAM_RESERVE for gpu in self.gpus]
        for placement in self.placements:
            for index, share in zip(placement.gpus, placement.split.devices, strict=True):
                left[index] -= share.total
        return left

    def to_json(self) -> dict[str, object]:
        return {
            "gpus": [{"name": g.name, "vram": g.vram} for g in self.gpus],
            "vram_reserve": VRAM_RESERVE,
            "ram_budget": self.ram_budget,
            "models": [p.to_json(self.gpus) for p in self.placements],
        }


def plan_gpus(models: Sequence[GpuModel], gpus: Sequence[Gpu], ram_budget: int) -> GpuPlan:
    """Place each model (preload ones first) on the VRAM and RAM the ones before left."""
    room = [max(0, gpu.vram - VRAM_RESERVE) for gpu in gpus]
    ram_left = ram_budget
    placements: list[Placement] = []
    for model in sorted(models, key=lambda m: not m.preload):
        placement = replace(_place(model, room, ram_left), n_gpus=len(gpus))
        if placement.fits:
            for index, share in zip(placement.gpus, placement.split.devices, strict=True):
                room[index] -= share.total
            ram_left -= placement.split.ram.total
        placements.append(placement)
    return GpuPlan(tuple(gpus), ram_budget, tuple(placements))


def _split(model: GpuModel, layers: int, shares: tuple[float, ...]) -> OffloadSplit:
    return split_for(model.facts, model.memory, layers, shares)


def _fits(split: OffloadSplit, rooms: Sequence[int]) -> bool:
    return all(share.total <= room for share, room in zip(split.devices, rooms, strict=True))


def _place(model: GpuModel, room: list[int], ram_left: int) -> Placement:
    n_all = model.facts.n_layer + 1
    order = sorted(range(len(room)), key=lambda i: -room[i])
    cpu = _split(model, 0, (1.0,))
    # 1. whole, on the GPU with the most room
    if order:
        best = order[0]
        whole = _split(model, n_all, (1.0,))
        if _fits(whole, [room[best]]) and whole.ram.total <= ram_left:
            return Placement(model.name, whole, (best,), True,
                             f"all {n_all} layers on GPU {best} ({format_size(whole.vram)} of "
                             f"{format_size(room[best])} free)")
    # 2. whole, across the GPUs with room, in proportion to it
    usable = [i for i in order if room[i] > 0]
    if len(usable) > 1:
        shares = tuple(float(room[i] // MIB) for i in usable)
        whole = _split(model, n_all, shares)
        if _fits(whole, [room[i] for i in usable]) and whole.ram.total <= ram_left:
            return Placement(model.name, whole, tuple(usable), True,
                             f"all {n_all} layers across GPUs {', '.join(map(str, usable))} "
                             f"({format_size(whole.vram)} in VRAM)")
    # 3. as many layers as fit in VRAM, the rest in RAM
    if usable:
        shares = tuple(float(room[i] // MIB) for i in usable)
        rooms = [room[i] for i in usable]
        for layers in range(n_all - 1, 0, -1):
            partial = _split(model, layers, shares)
            if not _fits(partial, rooms):
                continue
            if partial.ram.total > ram_left:
                break  # fewer layers on the GPUs only needs more RAM
            used = tuple(i for i, share in zip(usable, partial.devices, strict=True) if share.total)
            gpus_used: tuple[int, ...] = tuple(usable)
            if len(used) == 1:
                partial, gpus_used = _split(model, layers, (1.0,)), used
            return Placement(model.name, partial, gpus_used, True,
                             f"{layers} of {n_all} layers on GPU {', '.join(map(str, used))} "
                             f"({format_size(partial.vram)}), the rest in RAM "
                             f"({format_size(partial.ram.total)}): VRAM is full")
    if cpu.ram.total <= ram_left:
        why = "no GPU" if not room else "no VRAM left for even one layer"
        return Placement(model.name, cpu, (), True, f"on the CPU: {why}")
    return Placement(model.name, cpu, (), False,
                     f"does not fit: needs {format_size(cpu.ram.total)} RAM on the CPU, "
                     f"{format_size(max(0, ram_left))} left and no VRAM for it")
