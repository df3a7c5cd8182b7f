"""`ctx_size: auto`: the largest context each such model can have, decided once at `lalo up`
(and `lalo plan`, `lalo reload`) from the RAM budget and the other models. Pure.

A model with `ctx_size: auto` gets the largest context, in steps of 256, that
- is at most what it can use: its trained length per slot (llama-server caps a slot there),
  times `parallel`, and at most `ctx_max`;
- fits the budget beside the preload models with a fixed context: preload `auto` models each
  get `FLOOR` tokens first (less if they can use less), then share what is left over in config
  order, each taking at most an equal part (what one does not need passes to the next); when
  not every floor fits, each in order takes the most that fits what the ones before it left;
- for an on-demand model, fits beside all preload models, or, when that leaves less than
  `FLOOR` tokens, the whole budget (loading it then unloads idle models, as any on-demand load).
A model whose facts are unknown (an unreadable file) keeps the fallback `ctx_size` (2048).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from launcher.config import ModelConfig
from launcher.models.shape import CTX_PAD, ModelFacts
from launcher.placement.estimate import MemorySettings, estimate_for
from launcher.placement.resolve import ResolvedModel
from launcher.units import format_size

FLOOR = 2048  # tokens an on-demand model should get beside the preload models, else the budget
UNKNOWN_TRAINED = 4096  # the cap for a model whose file does not say its trained length


@dataclass(frozen=True)
class ContextChoice:
    ctx_size: int
    reason: str  # for `lalo plan` and the log: "8192, the trained length; fits 1.2 GiB"


def usable_ctx(facts: ModelFacts, config: ModelConfig) -> tuple[int, str]:
    """The most context the model can use, and what set it."""
    trained = facts.n_ctx_train or UNKNOWN_TRAINED
    cap = trained * config.parallel
    slots = f" x {config.parallel} slots" if config.parallel > 1 else ""
    what = (f"the trained length {trained}{slots}" if facts.n_ctx_train
            else f"{UNKNOWN_TRAINED}{slots} (the file does not say its trained length)")
    if config.ctx_max is not None and config.ctx_max < cap:
        return config.ctx_max // CTX_PAD * CTX_PAD, f"ctx_max {config.ctx_max}"
    return cap // CTX_PAD * CTX_PAD, what


def largest_ctx(facts: ModelFacts, settings: MemorySettings, room: int, cap: int) -> int | None:
    """The largest multiple of 256 up to `cap` whose estimate fits `room`; None if not even 256."""
    def fits(steps: int) -> bool:
        return estimate_for(facts, replace(settings, ctx_size=steps * CTX_PAD)).total <= room

    low, high = 1, max(1, cap // CTX_PAD)
    if not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low * CTX_PAD


@dataclass(frozen=True)
class AutoModel:
    """What the choice needs of one configured model."""

    name: str
    config: ModelConfig
    facts: ModelFacts | None
    required: int  # bytes at its configured (or fallback) context: for the fixed models


def choose_contexts(models: Sequence[AutoModel], budget: int,
                    keep: Mapping[str, int] | None = None) -> dict[str, ContextChoice]:
    """The context of every `ctx_size: auto` model with known facts. `keep`: contexts chosen
    before for models whose settings did not change (a reload keeps them: the RAM their
    servers hold now is not free)."""
    keep = keep or {}
    fixed = sum(m.required for m in models
                if m.config.preload and not m.config.ctx_auto and m.required <= budget)
    chosen: dict[str, ContextChoice] = {}
    for name, ctx in keep.items():
        chosen[name] = ContextChoice(ctx, f"{ctx}, kept from before the reload")
    sized = [m for m in models if m.config.ctx_auto and m.facts is not None and m.name not in chosen]
    kept_bytes = sum(_bytes(m, chosen[m.name].ctx_size) for m in models
                     if m.name in chosen and m.facts is not None and m.config.preload)
    left = max(0, budget - fixed - kept_bytes)
    preload = [m for m in sized if m.config.preload]
    # each first gets its floor (2048 tokens, or less if it can use less); what the floors leave
    # is shared, each taking at most an equal part of what is left on top of its floor
    floors = {m.name: _bytes(m, _floor(m)) for m in preload}
    extra = left - sum(floors.values())
    for index, model in enumerate(preload):
        assert model.facts is not None
        if extra >= 0:
            room = floors[model.name] + extra // (len(preload) - index)
            where = f"its share of {format_size(left)} left beside the fixed preload models"
        else:  # not every floor fits: in config order, each the most that fits what is left
            room = left
            where = f"{format_size(left)} left beside the models before it"
        choice = _choose(model, model.facts, room, where)
        chosen[model.name] = choice
        used = _bytes(model, choice.ctx_size)
        extra -= max(0, used - floors[model.name])
        left -= min(left, used)
    for model in (m for m in sized if not m.config.preload):
        assert model.facts is not None
        choice = _choose(model, model.facts, left, f"{format_size(left)} left beside the preload "
                         "models")
        if choice.ctx_size < min(FLOOR, usable_ctx(model.facts, model.config)[0]):
            choice = _choose(model, model.facts, budget, f"the budget of {format_size(budget)}, "
                             "unloading idle models to load")
        chosen[model.name] = choice
    return chosen


def _choose(model: AutoModel, facts: ModelFacts, room: int, where: str) -> ContextChoice:
    cap, what = usable_ctx(facts, model.config)
    settings = MemorySettings.of(model.config)
    ctx = largest_ctx(facts, settings, room, cap)
    if ctx is None:  # not even 256 tokens: the plan says it cannot fit, with its hints
        ctx = min(cap, CTX_PAD)
        return ContextChoice(ctx, f"{ctx}: not even this fits {where}")
    if ctx == cap:
        return ContextChoice(ctx, f"{ctx}, {what}; fits {where}")
    return ContextChoice(ctx, f"{ctx}, the most that fits {where} (can use {cap}: {what})")


def _floor(model: AutoModel) -> int:
    assert model.facts is not None
    return min(FLOOR, usable_ctx(model.facts, model.config)[0])


def _bytes(model: AutoModel, ctx: int) -> int:
    assert model.facts is not None
    return estimate_for(model.facts, replace(MemorySettings.of(model.config), ctx_size=ctx)).total


def fit_contexts(models: Sequence[ResolvedModel], budget: int,
                 keep: Mapping[str, int] | None = None) -> list[ResolvedModel]:
    """`models` with each `ctx_size: auto` one set to its chosen context (config, estimate and
    the reason, `ctx_note`); the others as they are."""
    if not any(m.config.ctx_auto for m in models):
        return list(models)
    choices = choose_contexts([AutoModel(m.name, m.config, m.facts, m.required) for m in models],
                              budget, keep)
    fitted = []
    for model in models:
        choice = choices.get(model.name)
        if choice is None or model.facts is None:
            fitted.append(model)
            continue
        config = model.config.model_copy(update={"ctx_size": choice.ctx_size})
        fitted.append(replace(model, config=config, measured=None,
                              ctx_note=f"ctx_size auto: {choice.reason}",
                              estimate=estimate_for(model.facts, MemorySettings.of(config))))
    return fitted
