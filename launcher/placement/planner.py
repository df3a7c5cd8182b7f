"""Which models to load within the RAM budget: pure functions, each decision with its reason.

`make_plan` decides what `lalo up` preloads; what to load, evict or keep waiting while
lalo runs is `launcher.placement.scheduler`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from launcher.models.shape import ModelFacts
from launcher.placement.estimate import MemorySettings, fitting_quantizations, largest_fitting_ctx
from launcher.units import format_size

Action = Literal["start", "on-demand", "cannot-fit", "invalid"]


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str  # how it was decided, for humans


def compute_budget(ram_budget: int | str, ram_reserve: int, available: int,
                   limit_note: str | None = None) -> Budget:
    """`auto` = available RAM minus the reserve; otherwise the configured figure. `limit_note`
    says where the figures come from when a container's memory limit sets them."""
    suffix = f"; {limit_note}" if limit_note else ""
    if ram_budget == "auto":
        value = max(0, available - ram_reserve)
        return Budget(
            value,
            f"auto: {format_size(available)} available - {format_size(ram_reserve)} reserve"
            f"{suffix}",
        )
    assert isinstance(ram_budget, int)
    note = ""
    if ram_budget > available:
        note = f" (more than the {format_size(available)} available now)"
    return Budget(ram_budget, f"configured: {format_size(ram_budget)}{note}{suffix}")


@dataclass(frozen=True)
class Candidate:
    """A configured model as the planner sees it."""

    name: str
    required: int  # bytes: the measured figure when known, else the estimate
    preload: bool
    measured: bool = False
    facts: ModelFacts | None = None
    ctx_size: int = 2048
    parallel: int = 1
    invalid: str | None = None  # why the model file cannot be used at all
    settings: MemorySettings | None = None  # kv_cache and the args read; None: f16, defaults
    ctx_note: str | None = None  # how `ctx_size: auto` was decided

    @property
    def memory(self) -> MemorySettings:
        return self.settings or MemorySettings(self.ctx_size, self.parallel)


@dataclass(frozen=True)
class Decision:
    name: str
    action: Action
    required: int
    reason: str
    suggestions: tuple[str, ...] = ()
    settings: MemorySettings | None = None  # what the figure was estimated with
    ctx_note: str | None = None  # how `ctx_size: auto` was decided


@dataclass(frozen=True)
class Plan:
    budget: Budget
    max_loaded: int
    decisions: tuple[Decision, ...] = field(default_factory=tuple)

    @property
    def preload_total(self) -> int:
        return sum(d.required for d in self.decisions if d.action == "start")

    @property
    def remaining(self) -> int:
        return self.budget.bytes - self.preload_total

    def decision(self, name: str) -> Decision:
        return next(d for d in self.decisions if d.name == name)

    def to_json(self) -> dict[str, object]:
        return {
            "budget": self.budget.bytes,
            "budget_source": self.budget.source,
            "max_loaded": self.max_loaded,
            "preload_total": self.preload_total,
            "remaining": self.remaining,
            "models": [
                {
                    "name": d.name,
                    "action": d.action,
                    "required": d.required,
                    "reason": d.reason,
                    "suggestions": list(d.suggestions),
                    **({"ctx_size": d.settings.ctx_size, "parallel": d.settings.parallel,
                        "kv_cache": d.settings.kv_type} if d.settings is not None else {}),
                    **({"ctx_note": d.ctx_note} if d.ctx_note else {}),
                }
                for d in self.decisions
            ],
        }


def make_plan(candidates: Sequence[Candidate], budget: Budget, max_loaded: int = 0) -> Plan:
    """Preload models start in config order while they fit and `max_loaded` allows."""
    used = 0
    started: list[str] = []
    decisions: list[Decision] = []
    for model in candidates:
        need = model.required
        what = "measured" if model.measured else "estimated"
        if model.memory.note():  # a quantized KV cache, args read into the plan
            what += f", {model.memory.note()}"
        if model.invalid is not None:
            decisions.append(Decision(model.name, "invalid", 0, model.invalid))
            continue
        if need > budget.bytes:
            decisions.append(
                Decision(
                    model.name,
                    "cannot-fit",
                    need,
                    f"needs {format_size(need)} ({what}), more than the whole budget of "
                    f"{format_size(budget.bytes)}",
                    _suggestions(model, budget.bytes),
                )
            )
            continue
        if not model.preload:
            decisions.append(
                Decision(model.name, "on-demand", need,
                         f"loads on first request; needs {format_size(need)} ({what})")
            )
            continue
        if max_loaded and len(started) >= max_loaded:
            decisions.append(
                Decision(model.name, "on-demand", need,
                         f"max_loaded={max_loaded} reached by {', '.join(started)}; "
                         "loads on first request")
            )
            continue
        if used + need > budget.bytes:
            decisions.append(
                Decision(
                    model.name,
                    "on-demand",
                    need,
                    f"needs {format_size(need)} but only {format_size(budget.bytes - used)} is left "
                    f"beside {', '.join(started)}; loads on first request, unloading idle models",
                )
            )
            continue
        used += need
        started.append(model.name)
        decisions.append(
            Decision(model.name, "start", need,
                     f"fits: {format_size(need)} ({what}), {format_size(budget.bytes - used)} left")
        )
    # one decision per candidate, in order: each says what its figure was estimated with
    return Plan(budget=budget, max_loaded=max_loaded, decisions=tuple(
        replace(decision, settings=model.memory, ctx_note=model.ctx_note)
        for decision, model in zip(decisions, candidates, strict=True)))


def _suggestions(model: Candidate, budget: int) -> tuple[str, ...]:
    if model.facts is None:
        return ("free RAM or raise resources.ram_budget",)
    hints: list[str] = []
    ctx = largest_fitting_ctx(model.facts, budget, model.memory)
    if ctx is not None and ctx < model.ctx_size:
        hints.append(f"ctx_size: {ctx} would fit")
    if model.memory.kv_type == "f16":
        smaller = largest_fitting_ctx(model.facts, budget, replace(model.memory, kv_type="q8_0"))
        if smaller is not None and smaller >= model.ctx_size:
            hints.append(f"kv_cache: q8_0 would fit at ctx_size {model.ctx_size}")
    quants = fitting_quantizations(model.facts, budget, model.memory)
    if quants:
        name, total = quants[0]
        hints.append(f"a {name} file (~{format_size(total)}) would fit at ctx_size {model.ctx_size}")
    if not hints:
        hints.append("no smaller context or quantization fits; use a smaller model or free RAM")
    return tuple(hints)
