"""From the config to what `lalo up` starts with: the models resolved and fitted to this
machine (contexts, GPU layers, measured sizes) and the plan of which load now."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from launcher.config import LoadedConfig
from launcher.errors import StartupError
from launcher.machine.memory import system_memory
from launcher.placement.context import fit_contexts
from launcher.placement.gpu_offload import Offload, machine_offload
from launcher.placement.measurements import Measurements, with_measurements
from launcher.placement.planner import Plan, compute_budget, make_plan
from launcher.placement.resolve import ResolvedModel, resolve_models

if TYPE_CHECKING:
    from launcher.models.catalog import CatalogResolver


@dataclass(frozen=True)
class Prepared:
    """The models as they will be served, the plan, and each model's GPU offload."""

    models: list[ResolvedModel]
    plan: Plan
    offload: Offload


def prepare(loaded: LoadedConfig, measurements: Measurements,
            catalog: CatalogResolver | None = None) -> Prepared:
    resources = loaded.config.resources
    memory = system_memory()
    ctx_budget = compute_budget(resources.ram_budget, resources.ram_reserve, memory.available).bytes
    models = fit_contexts(resolve_models(loaded, catalog=catalog), ctx_budget)
    models = usable_models(with_measurements(models, measurements))
    # on a GPU machine: each model's layers per GPU, and only its RAM part in the budget
    offload = machine_offload(loaded, models, memory.available)
    models = offload.apply(models, measurements)
    plan = plan_models(loaded, models, memory.available, memory.limit_note())
    return Prepared(models, plan, offload)


def plan_models(loaded: LoadedConfig, models: Sequence[ResolvedModel], available: int,
                limit_note: str | None = None) -> Plan:
    resources = loaded.config.resources
    budget = compute_budget(resources.ram_budget, resources.ram_reserve, available, limit_note)
    return make_plan([m.candidate() for m in models], budget, resources.max_loaded)


def usable_models(models: Sequence[ResolvedModel]) -> list[ResolvedModel]:
    """Models without a file become failed with the command that fixes it; StartupError when
    no model at all can be served (one model's trouble is its own)."""
    out: list[ResolvedModel] = []
    for model in models:
        if model.path is None and model.error is None:
            entry = model.config.catalog
            model = dataclasses.replace(model, error=(
                f"catalog model {entry!r} is not downloaded and could not be pulled; "
                f"run `lalo models pull {entry}` where the hub is reachable"))
        out.append(model)
    if out and all(m.error is not None for m in out):
        raise StartupError("no model can be served:\n" + "\n".join(
            f"  {m.name}: {m.error}" for m in out))
    return out
