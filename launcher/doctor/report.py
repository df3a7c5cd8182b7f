"""`lalo doctor`: this machine's CPU, RAM, disk and engines, which catalog models fit, and
(`--bench`) the decode speed each would get, measured on random weights of the same shape.
"""

from __future__ import annotations

import logging
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.config import ResourcesConfig
from launcher.engines.registry import FoundEngine, list_engines
from launcher.errors import EngineError
from launcher.machine.gpu import GpuReport, describe, gpu_facts
from launcher.machine.hardware import FEATURES, CpuInfo, cpu_info
from launcher.machine.memory import system_memory
from launcher.models.catalog import Catalog, cached_entry_path, default_catalog
from launcher.models.facts import entry_facts
from launcher.models.hub import HubClient
from launcher.placement.estimate import estimate_memory
from launcher.placement.planner import Budget, Candidate, compute_budget, make_plan
from launcher.units import format_size

log = logging.getLogger(__name__)
GIB = 1024**3

@dataclass(frozen=True)
class Tier:
    """A hardware tier of the original plan, as numbers lalo can check."""

    name: str
    min_ram: int
    min_cores: int
    means: str


# The plan's tiers (8 GB dev laptop, then its $500 / $2,000 / $10,000 / $50,000 machines).
TIERS: tuple[Tier, ...] = (
    Tier("dev laptop", 8 * GIB, 2, "350M-1.2B models at Q4_K_M, two or three loaded at once"),
    Tier("tier 1 (entry)", 16 * GIB, 8, "every catalog model at once on CPU"),
    Tier("tier 2 (standard)", 32 * GIB, 12, "7B models at Q4_K_M on CPU; a 16 GB GPU in the plan"),
    Tier("tier 3 (pro)", 64 * GIB, 16, "14B models; a 24 GB GPU in the plan"),
    Tier("tier 4 (enterprise)", 256 * GIB, 32, "70B+ models; data-centre GPUs in the plan"),
)


@dataclass(frozen=True)
class GpuTier:
    """A GPU tier of the original plan: per-GPU VRAM (nominal) and how many such GPUs."""

    name: str
    min_vram: int  # per GPU
    count: int
    means: str


GPU_TIERS: tuple[GpuTier, ...] = (
    GpuTier("RTX 4060 Ti 16 GB", 16 * GIB, 1, "7B at Q4_K_M fully in VRAM, 14B partly"),
    GpuTier("RTX 4090 24 GB", 24 * GIB, 1, "14B at Q4_K_M fully in VRAM, several small models"),
    GpuTier("2x A100 80 GB", 80 * GIB, 2, "70B at Q4_K_M fully in VRAM"),
    GpuTier("4x A100 80 GB", 80 * GIB, 4, "70B at Q8_0 or several 70B at Q4_K_M"),
)


def gpu_tier(vram_per_gpu: list[int]) -> GpuTier | None:
    """The highest GPU tier met: `count` GPUs of at least 90 % of `min_vram` each."""
    reached: GpuTier | None = None
    for tier in GPU_TIERS:
        if sum(1 for vram in vram_per_gpu if vram >= tier.min_vram * 0.9) >= tier.count:
            reached = tier
    return reached


@dataclass(frozen=True)
class ModelFit:
    """A catalog model's estimate at its default context on this machine."""

    id: str
    file_type: str
    size: int
    ctx_size: int
    estimate: int
    fits_now: bool  # within the auto budget (available RAM minus the reserve)
    fits_machine: bool  # within total RAM minus the reserve (after closing other programs)
    cached: bool
    license: str


@dataclass(frozen=True)
class DoctorReport:
    system: str
    python: str
    cpu: CpuInfo
    ram_total: int
    ram_available: int
    budget: Budget
    disk_path: str
    disk_free: int
    gpus: tuple[str, ...]  # one line per GPU
    gpu: GpuReport
    gpu_tier: GpuTier | None
    engines: tuple[dict[str, Any], ...]
    engine_error: str | None
    tier: Tier | None
    models: tuple[ModelFit, ...]
    fit_together: tuple[str, ...]  # the catalog models that load side by side now, in order

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["budget"] = {"bytes": self.budget.bytes, "source": self.budget.source}
        data["gpu"] = self.gpu.to_json()
        return data


def machine_tier(ram_total: int, cores: int) -> Tier | None:
    """The highest tier whose RAM (nominal, so 90 % of it counts) and core count are met."""
    reached: Tier | None = None
    for tier in TIERS:
        if ram_total >= tier.min_ram * 0.9 and cores >= tier.min_cores:
            reached = tier
    return reached


def collect_report(
    *,
    catalog: Catalog | None = None,
    client: HubClient | None = None,
    engines_configured: str = "auto",
    resources: ResourcesConfig | None = None,
) -> DoctorReport:
    entries = catalog if catalog is not None else default_catalog()
    hub = client if client is not None else HubClient()
    reserve = (resources or ResourcesConfig()).ram_reserve
    memory = system_memory()
    budget = compute_budget((resources or ResourcesConfig()).ram_budget, reserve, memory.available,
                            memory.limit_note())
    cpu = cpu_info()
    disk_path = _existing_parent(hub.settings.cache_dir)
    engine_error: str | None = None
    try:
        found = list_engines(engines_configured)
    except EngineError as exc:
        found, engine_error = [], str(exc)
    fits: list[ModelFit] = []
    candidates: list[Candidate] = []
    for entry in entries:
        path = cached_entry_path(entry, client=hub)
        # the file's own facts once it is pulled: the figure `lalo plan` and `lalo up` use
        facts = entry_facts(entry, path)
        estimate = estimate_memory(facts, entry.default_ctx).total
        fits.append(
            ModelFit(
                id=entry.id,
                file_type=entry.file_type,
                size=entry.size,
                ctx_size=entry.default_ctx,
                estimate=estimate,
                fits_now=estimate <= budget.bytes,
                fits_machine=estimate <= memory.total - reserve,
                cached=path is not None,
                license=entry.license.id,
            )
        )
        candidates.append(
            Candidate(entry.id, estimate, preload=True, facts=facts, ctx_size=entry.default_ctx)
        )
    plan = make_plan(candidates, budget)
    gpu_report = gpu_facts()
    return DoctorReport(
        system=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        cpu=cpu,
        ram_total=memory.total,
        ram_available=memory.available,
        budget=budget,
        disk_path=str(disk_path),
        disk_free=shutil.disk_usage(disk_path).free,
        gpus=tuple(g.line() for g in gpu_report.gpus),
        gpu=gpu_report,
        gpu_tier=gpu_tier([g.vram_total for g in gpu_report.gpus]),
        engines=tuple(_engine_json(engine) for engine in found),
        engine_error=engine_error,
        tier=machine_tier(memory.total, cpu.physical_cores),
        models=tuple(fits),
        fit_together=tuple(d.name for d in plan.decisions if d.action == "start"),
    )


def _engine_json(engine: FoundEngine) -> dict[str, Any]:
    return {
        "kind": engine.kind,
        "path": str(engine.path),
        "origin": engine.origin,
        "version": engine.version,
        "variant": engine.variant,
    }


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def format_report(report: DoctorReport) -> list[str]:
    cpu = report.cpu
    lines = [
        f"system      {report.system}, Python {report.python}",
        f"cpu         {cpu.model} ({cpu.machine}), {cpu.physical_cores} cores / {cpu.logical_cores} threads",
        f"features    {' '.join(cpu.features) or 'none of ' + ', '.join(FEATURES[:5])}",
        f"ram         {format_size(report.ram_total)} total, {format_size(report.ram_available)} "
        f"available; budget {format_size(report.budget.bytes)} ({report.budget.source})",
        f"disk        {format_size(report.disk_free)} free in {report.disk_path}",
        f"gpu         {describe(report.gpu)}",
    ]
    if report.engines:
        for engine in report.engines:
            lines.append(
                f"engine      {engine['kind']} {engine['version'] or '(version unknown)'} "
                f"[{engine['origin']}] {engine['path']}"
            )
    else:
        lines.append(f"engine      none found ({report.engine_error or 'run `lalo engine build`'})")
    tier = report.tier
    lines.append(
        f"tier        {tier.name}: {tier.means}"
        if tier
        else "tier        below the plan's 8 GB dev laptop: only the smallest models"
    )
    higher = TIERS[TIERS.index(tier) + 1 :] if tier else TIERS
    if higher:
        lines.append(
            f"            ({higher[0].name} needs {format_size(higher[0].min_ram)} RAM and "
            f"{higher[0].min_cores} cores)"
        )
    if report.gpu_tier:
        lines.append(f"gpu tier    {report.gpu_tier.name}: {report.gpu_tier.means}")
    lines.append("")
    width = max((len(m.id) for m in report.models), default=5)
    lines.append(f"{'model':<{width}}  {'file':>9}  {'ctx':>5}  {'needs':>9}  fits now  cached  licence")
    for m in report.models:
        verdict = "yes" if m.fits_now else ("after freeing RAM" if m.fits_machine else "no")
        lines.append(
            f"{m.id:<{width}}  {format_size(m.size):>9}  {m.ctx_size:>5}  "
            f"{format_size(m.estimate):>9}  {verdict:<8}  {'yes' if m.cached else 'no':<6}  "
            f"{m.license}"
        )
    together = ", ".join(report.fit_together) or "none"
    lines.append(f"loaded together now: {together}")
    return lines


# --- decode benchmark on random weights -------------------------------------------------------
