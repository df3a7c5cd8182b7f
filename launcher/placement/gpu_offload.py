"""What each model's llama-server is told about the GPUs, and the RAM it then holds.

Per model (`models.NAME.gpu_layers`): `auto` = lalo's GPU plan (`gpu_plan.plan_gpus`: its
`--n-gpu-layers N --tensor-split ...`, and only the RAM part of the model counted in the RAM
budget), `fit` = nothing passed (llama-server's own `--fit` decides at start), an integer = that
many layers. Without GPUs, or with a llama-server built for the CPU only, nothing is passed.
`plan_offload` is pure; `machine_offload` reads the GPUs (NVML) and the engine for `lalo up` and
`lalo plan`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from launcher.config import LoadedConfig
from launcher.config.server_args import offload_flag
from launcher.engines.base import ServerSettings
from launcher.placement.estimate import MemoryEstimate, MemorySettings
from launcher.placement.gpu_plan import VRAM_RESERVE, Gpu, GpuModel, GpuPlan, Placement, plan_gpus
from launcher.placement.gpu_split import split_for
from launcher.placement.planner import compute_budget
from launcher.units import format_size

if TYPE_CHECKING:
    from launcher.machine.gpu import GpuReport
    from launcher.placement.measurements import Measurements
    from launcher.placement.resolve import ResolvedModel

Mode = Literal["plan", "fit", "layers", "args", "cpu"]
# CUDA numbers GPUs fastest first unless told otherwise; NVML (and so lalo's plan) by PCI bus:
# the children must count like NVML for --tensor-split to name the GPUs the plan meant
DEVICE_ORDER_ENV = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


@dataclass(frozen=True)
class Assignment:
    """One model's GPU settings: what llama-server is passed and the RAM the budget counts."""

    mode: Mode
    reason: str
    gpu_layers: int | None = None  # --n-gpu-layers; None: not passed
    tensor_split: tuple[float, ...] = ()
    ram: MemoryEstimate | None = None  # the RAM part when layers are offloaded; None: all in RAM
    vram: int = 0  # what the plan reserves on the GPUs, all together

    def flags(self) -> str:
        if self.gpu_layers is None:
            return "--fit" if self.mode == "fit" else "-"
        split = ("" if not self.tensor_split else
                 " --tensor-split " + ",".join(f"{share:g}" for share in self.tensor_split))
        return f"-ngl {self.gpu_layers}{split}"

    def line(self) -> str:
        if self.gpu_layers is None and self.mode != "fit":
            return f"nothing passed: {self.reason}"
        return f"{self.flags()}: {self.reason}"

    def to_json(self) -> dict[str, object]:
        return {"mode": self.mode, "gpu_layers": self.gpu_layers,
                "tensor_split": list(self.tensor_split), "vram": self.vram,
                "ram": self.ram.total if self.ram is not None else None, "reason": self.reason}


NOTHING = Assignment("cpu", "no GPU")


@dataclass(frozen=True)
class Offload:
    """The GPU settings of every model, decided once from the GPUs seen at start."""

    gpus: tuple[Gpu, ...] = ()
    engine_gpu: bool = False  # the llama-server in use can offload (a CUDA build, or unknown)
    note: str = "no GPU"  # how the GPUs and the engine were found, for humans
    assignments: Mapping[str, Assignment] = field(default_factory=dict)
    ram_budget: int = 0
    gpu_plan: GpuPlan | None = None  # the `auto` models' placements, per GPU
    vram_left: tuple[int, ...] = ()  # per GPU, once every model has its share (reserve kept)

    def replan(self, models: Sequence[ResolvedModel]) -> Offload:
        """The same GPUs and engine for another set of models (`lalo reload`): the VRAM seen
        at start, before lalo's own servers took any."""
        return plan_offload(models, self.gpus, self.ram_budget, engine_gpu=self.engine_gpu,
                            note=self.note)

    def assignment(self, name: str) -> Assignment:
        return self.assignments.get(name, NOTHING)

    def server_settings(self, name: str, settings: ServerSettings) -> ServerSettings:
        """`settings` with the model's -ngl / --tensor-split (and CUDA's device order)."""
        chosen = self.assignment(name)
        if chosen.gpu_layers is None:
            return settings
        env = {**DEVICE_ORDER_ENV, **settings.env} if chosen.tensor_split else settings.env
        return dataclasses.replace(settings, gpu_layers=chosen.gpu_layers,
                                   tensor_split=chosen.tensor_split, env=env)

    def measurement_key(self, name: str, key: str) -> str:
        """Peak RSS is remembered per offload too: a CPU run's figure is not an offloaded one's."""
        chosen = self.assignment(name)
        if chosen.mode == "fit":
            return f"{key}|fit"
        if not chosen.gpu_layers:
            return key
        split = ",".join(f"{share:g}" for share in chosen.tensor_split)
        return f"{key}|ngl={chosen.gpu_layers}" + (f"|ts={split}" if split else "")

    def apply(self, models: Sequence[ResolvedModel],
              measurements: Measurements | None = None) -> list[ResolvedModel]:
        """The models with the RAM the budget counts: the RAM part of an offloaded model (its
        estimate), its RSS measured with the same offload (not a CPU run's)."""
        from launcher.placement.measurements import measurement_key

        out: list[ResolvedModel] = []
        for model in models:
            chosen = self.assignment(model.name)
            if chosen.ram is not None:
                model = dataclasses.replace(model, estimate=chosen.ram)
            if measurements is not None and model.path is not None and (
                    chosen.mode == "fit" or chosen.gpu_layers):
                cfg = model.config
                key = measurement_key(model.path, cfg.engine_kind, cfg.ctx_size, cfg.parallel,
                                      MemorySettings.of(cfg).key())
                model = dataclasses.replace(
                    model, measured=measurements.get(self.measurement_key(model.name, key)))
            out.append(model)
        return out

    def lines(self) -> list[str]:
        """For `lalo up`: the GPUs and, per model, which setting applies (nothing on a machine
        without GPUs where no model sets gpu_layers)."""
        if not self.gpus and all(a.gpu_layers is None for a in self.assignments.values()):
            return []  # a machine without GPUs: nothing to say
        return [f"gpu: {self.note}",
                *(f"  {name}: {a.line()}" for name, a in self.assignments.items())]

    def to_json(self) -> dict[str, object]:
        return {"gpus": [{"name": g.name, "vram": g.vram} for g in self.gpus],
                "engine_gpu": self.engine_gpu, "note": self.note,
                "models": {name: a.to_json() for name, a in self.assignments.items()}}


NO_GPU = Offload()


def plan_offload(models: Sequence[ResolvedModel], gpus: Sequence[Gpu], ram_budget: int,
                 *, engine_gpu: bool = True, note: str = "") -> Offload:
    """Each model's GPU settings, in the plan's order (preload models first, then config
    order), each on the VRAM and RAM the ones before left: an explicit layer count takes the
    VRAM it needs as given, an `auto` model gets lalo's placement."""
    gpus = tuple(gpus)
    note = note or gpus_note(gpus)
    assignments: dict[str, Assignment] = {}
    room = [max(0, gpu.vram - VRAM_RESERVE) for gpu in gpus]
    ram_left = ram_budget
    placements: list[Placement] = []
    for model in sorted(models, key=lambda m: not m.config.preload):
        cfg = model.config
        setting = cfg.gpu_layers
        if cfg.engine_kind != "llama-server":
            chosen = Assignment("cpu", f"engine {cfg.engine_kind}: lalo passes no GPU settings")
        elif (flag := offload_flag(cfg.args)) is not None:
            chosen = Assignment("args", f"its args set {flag}; the RAM budget counts it as all "
                                "in RAM")
        elif isinstance(setting, int):
            chosen = _explicit(model, setting, gpus, room, engine_gpu)
        elif not gpus or not engine_gpu:
            chosen = Assignment("cpu", "no GPU" if not gpus else
                                "the llama-server in use is a CPU build")
        elif setting == "fit":
            chosen = Assignment("fit", "llama-server's --fit picks the layers at start "
                                "(gpu_layers: fit); no VRAM reserved for it, the RAM budget "
                                "counts it as all in RAM")
        elif model.facts is None or model.error is not None:
            chosen = Assignment("cpu", "no model facts to plan with")
        else:
            # plan_gpus keeps its own reserve: hand it the room left plus that reserve
            left = tuple(dataclasses.replace(gpu, vram=max(0, r) + VRAM_RESERVE)
                         for gpu, r in zip(gpus, room, strict=True))
            one = GpuModel(model.name, model.facts, cfg.ctx_size, cfg.parallel, cfg.preload,
                           MemorySettings.of(cfg))
            placement = plan_gpus([one], left, ram_left).placements[0]
            placements.append(placement)
            for index, share in zip(placement.gpus, placement.split.devices, strict=True):
                room[index] -= share.total
            reason = placement.reason
            if placement.gpus:
                reason += (f"; RAM {format_size(placement.split.ram.total)}, "
                           f"VRAM {format_size(placement.split.vram)}")
            chosen = Assignment(
                "plan", reason + " (lalo's plan)", placement.gpu_layers if placement.gpus else 0,
                placement.tensor_split, placement.split.ram if placement.gpus else None,
                placement.split.vram)
        ram_left -= chosen.ram.total if chosen.ram is not None else model.required
        assignments[model.name] = chosen
    ordered = {m.name: assignments[m.name] for m in models}
    gpu_plan = GpuPlan(gpus, ram_budget, tuple(placements)) if placements else None
    return Offload(gpus, engine_gpu, note, ordered, ram_budget, gpu_plan,
                   tuple(r + VRAM_RESERVE for r in room))


def _explicit(model: ResolvedModel, layers: int, gpus: Sequence[Gpu], room: list[int],
              engine_gpu: bool) -> Assignment:
    """`gpu_layers: N`: passed as given; with GPUs its RAM part is counted and its VRAM taken
    from the room (llama.cpp splits the layers by free VRAM, as here)."""
    if not gpus or not engine_gpu or model.facts is None or layers == 0:
        why = ("no GPU seen" if not gpus else "a CPU build" if not engine_gpu
               else "no model facts" if model.facts is None else "all on the CPU")
        return Assignment("layers", f"gpu_layers: {layers} as configured ({why}: counted as "
                          "all in RAM)", layers)
    shares = tuple(float(max(1, r // (1024 * 1024))) for r in room)
    split = split_for(model.facts, MemorySettings.of(model.config), layers, shares)
    over = [f"GPU {i} needs {format_size(share.total)}, {format_size(max(0, room[i]))} free"
            for i, share in enumerate(split.devices) if share.total > room[i]]
    for index, share in enumerate(split.devices):
        room[index] -= share.total
    n_all = model.facts.n_layer + 1
    reason = (f"gpu_layers: {layers} as configured ({min(layers, n_all)} of {n_all} layers; "
              f"RAM {format_size(split.ram.total)}, VRAM {format_size(split.vram)})")
    if over:
        reason += f"; more than the VRAM left: {'; '.join(over)}"
    return Assignment("layers", reason, layers, (), split.ram, split.vram)


def gpus_note(gpus: Sequence[Gpu]) -> str:
    if not gpus:
        return "no GPU"
    return "; ".join(f"GPU {i}: {g.name} ({format_size(g.vram)} free)" for i, g in enumerate(gpus))


def visible_gpus(report: GpuReport, env: Mapping[str, str]) -> tuple[list[Gpu], str | None]:
    """The GPUs CUDA will number 0, 1, ... for the children: NVML's, narrowed and ordered by
    $CUDA_VISIBLE_DEVICES when it lists indexes; None or a reason the plan cannot be used."""
    gpus = [Gpu(g.name, g.vram_free) for g in report.gpus]
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return gpus, None
    parts = [part.strip() for part in visible.split(",") if part.strip()]
    by_index = {g.index: Gpu(g.name, g.vram_free) for g in report.gpus}
    if not all(part.isdigit() for part in parts):
        return [], (f"CUDA_VISIBLE_DEVICES={visible!r} names GPUs by UUID or MIG: lalo plans "
                    "only for GPU indexes, so llama-server's --fit decides")
    chosen: list[Gpu] = []
    for part in parts:  # CUDA stops at the first index that does not exist
        if int(part) not in by_index:
            break
        chosen.append(by_index[int(part)])
    return chosen, None


def engine_offloads(loaded: LoadedConfig) -> tuple[bool, str]:
    """Whether the llama-server `lalo up` will run can offload, and how that was found."""
    from launcher.engines.registry import find_llama_server

    settings = loaded.config.engines.llama_server
    found = find_llama_server(settings.path, settings.variant, probe=lambda binary: None)
    if found is None:  # `lalo up` builds the configured variant
        cuda = settings.variant == "cuda"
        return cuda, f"llama-server to be built ({settings.variant})"
    if found.variant is None:
        return True, f"llama-server {found.path} (its build is not known: the plan assumes CUDA)"
    return found.variant == "cuda", f"llama-server {found.variant} build"


def quick_gpu_facts() -> GpuReport:
    """`gpu.gpu_facts()`, without importing NVML's bindings (tens of ms of `lalo up`'s start)
    on a Linux machine whose kernel has no NVIDIA driver (no /proc/driver/nvidia; WSL's GPU
    driver lives in /usr/lib/wsl/lib instead)."""
    from launcher.machine.gpu import GpuReport, gpu_facts

    if (sys.platform == "linux" and not Path("/proc/driver/nvidia").exists()
            and not Path("/usr/lib/wsl/lib").exists()):
        return GpuReport((), None, "no NVIDIA driver: /proc/driver/nvidia absent")
    return gpu_facts()


def machine_offload(
    loaded: LoadedConfig,
    models: Sequence[ResolvedModel],
    available: int,
    *,
    report: Callable[[], GpuReport] | None = None,
    env: Mapping[str, str] | None = None,
    engine: tuple[bool, str] | None = None,
) -> Offload:
    """The GPU settings for this machine: NVML's GPUs (their free VRAM now) and the engine."""
    facts = (report or quick_gpu_facts)()
    resources = loaded.config.resources
    budget = compute_budget(resources.ram_budget, resources.ram_reserve, available).bytes
    gpus, why_not = visible_gpus(facts, os.environ if env is None else env)
    if not facts.gpus:
        note = "none" + (f" ({facts.error})" if facts.error else "")
        return plan_offload(models, [], budget, engine_gpu=False, note=note)
    engine_gpu, engine_note = engine if engine is not None else engine_offloads(loaded)
    note = (why_not or gpus_note(gpus)) + f"; {engine_note}"
    return plan_offload(models, gpus, budget, engine_gpu=engine_gpu and bool(gpus), note=note)
