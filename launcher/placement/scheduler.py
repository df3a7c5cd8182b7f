"""Which model to load next when they do not all fit: pure functions over a snapshot.

The supervisor calls `schedule()` whenever something changes (a request arrives or ends, a
load finishes, a server stops or dies) with one `ModelView` per model, and acts on the
answer. The rules:

- A request for a model that does not fit *now* waits in line; only a model that can
  *never* fit (alone beside the pinned models, over the budget or `max_loaded`) is refused.
- Idle models (nothing in flight, nothing queued) make room; among them the cheapest to
  bring back goes first (its measured load time, else its size), then the least recently used.
  Pinned models are never victims, and neither is a model with requests in flight.
- Batch by model: a loaded model keeps serving its own queue while others wait, so that
  A,B,A,B traffic swaps once per batch instead of once per request. Once the oldest
  waiting request has waited `max_wait`, the models in its way are *closed*: they take no
  new requests, finish the ones in flight (never cut) and are then evicted. A model that
  was loaded less than `max_wait` ago is left to serve its batch first: with loads slower
  than `max_wait`, closing it at once would swap on every request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from launcher.units import format_size

# Load speed assumed for a model never loaded here (bytes/s): only ranks victims.
_ASSUMED_LOAD_RATE = 1.0e9


@dataclass(frozen=True)
class ModelView:
    """One model as the scheduler sees it."""

    name: str
    required: int  # bytes it holds (measured RSS when known, else the estimate)
    resident: bool = False  # holds memory: starting, ready, stopping, or a restart pending
    evictable: bool = False  # ready and not already stopping: may be unloaded
    in_flight: int = 0
    queued: int = 0  # requests (and load calls) waiting for it
    oldest_wait: float | None = None  # clock() when its oldest waiter arrived
    pinned: bool = False
    last_used: float = 0.0
    load_seconds: float | None = None  # measured time of its last load
    failed: bool = False  # failed for good: never loaded by the scheduler
    ready_since: float | None = None  # clock() when its server became ready

    def batch_over(self, now: float, max_wait: float) -> bool:
        """It has served `max_wait` since it was (re)loaded: a starved waiter may close it."""
        return self.ready_since is None or now - self.ready_since >= max_wait

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and self.queued == 0

    @property
    def reload_cost(self) -> float:
        """Seconds to bring it back: measured, else guessed from its size."""
        if self.load_seconds is not None:
            return self.load_seconds
        return self.required / _ASSUMED_LOAD_RATE


@dataclass(frozen=True)
class Load:
    name: str
    victims: tuple[str, ...]  # to unload first (each idle at decision time)
    reason: str
    cause: str = "fits"  # fits | idle (idle models make room) | max_wait (a request waited too long)


@dataclass(frozen=True)
class Schedule:
    loads: tuple[Load, ...] = ()
    closed: frozenset[str] = frozenset()  # resident models that take no new requests (draining)
    refused: tuple[tuple[str, str], ...] = ()  # (name, why it can never fit)
    waiting: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (name, why it waits)


def victim_order(models: Sequence[ModelView]) -> list[ModelView]:
    """Cheapest to bring back first (to 0.1 s), then least recently used."""
    return sorted(models, key=lambda m: (round(m.reload_cost, 1), m.last_used, m.name))


def never_fits(model: ModelView, others: Sequence[ModelView], budget: int,
               max_loaded: int) -> str | None:
    """Why `model` can never load (beside the pinned models that stay), or None."""
    pinned = [m for m in others if m.pinned and m.resident and m.name != model.name]
    held = sum(m.required for m in pinned)
    if model.required > budget:
        return (f"{model.name} needs {format_size(model.required)}; the RAM budget "
                f"{format_size(budget)} cannot hold it even alone")
    if model.required + held > budget:
        return (f"{model.name} needs {format_size(model.required)}; RAM budget "
                f"{format_size(budget)}, {format_size(held)} held by pinned models "
                f"({', '.join(m.name for m in pinned)})")
    if max_loaded and len(pinned) >= max_loaded:
        return (f"{model.name} cannot load: max_loaded={max_loaded} is taken by pinned models "
                f"({', '.join(m.name for m in pinned)})")
    return None


def _room(holding: Sequence[ModelView], candidates: Sequence[ModelView], needed: int,
          budget: int, max_loaded: int) -> list[ModelView] | None:
    """Victims from `candidates` (in order) so that `needed` fits beside `holding`; None if not."""
    used = sum(m.required for m in holding)
    count = len(holding)
    victims: list[ModelView] = []
    for model in candidates:
        if used + needed <= budget and (not max_loaded or count < max_loaded):
            break
        victims.append(model)
        used -= model.required
        count -= 1
    if used + needed > budget or (max_loaded and count >= max_loaded):
        return None
    return victims


def _limit(holding: Sequence[ModelView], needed: int, budget: int, max_loaded: int) -> str:
    used = sum(m.required for m in holding)
    if max_loaded and len(holding) >= max_loaded:
        return f"max_loaded={max_loaded} reached by {', '.join(m.name for m in holding)}"
    return (f"needs {format_size(needed)}, {format_size(max(0, budget - used))} of the "
            f"{format_size(budget)} budget free")


def schedule(models: Sequence[ModelView], budget: int, max_loaded: int, now: float,
             max_wait: float) -> Schedule:
    """What to load now, what to close, what to refuse; see the module doc for the rules."""
    holding = [m for m in models if m.resident]
    taken: set[str] = set()  # victims already given to an earlier load in this pass
    loads: list[Load] = []
    refused: list[tuple[str, str]] = []
    waiting: list[tuple[str, str]] = []
    closed: set[str] = set()
    wanted = sorted(
        (m for m in models if m.queued > 0 and not m.resident and not m.failed),
        key=lambda m: (m.oldest_wait if m.oldest_wait is not None else now, m.name),
    )
    for model in wanted:
        why = never_fits(model, models, budget, max_loaded)
        if why is not None:
            refused.append((model.name, why))
            continue
        staying = [m for m in holding if m.name not in taken]
        idle = victim_order([m for m in staying if m.evictable and not m.pinned and m.idle])
        victims = _room([m for m in staying], idle, model.required, budget, max_loaded)
        waited = now - model.oldest_wait if model.oldest_wait is not None else 0.0
        starved = waited >= max_wait and model.oldest_wait is not None
        if victims is None and starved and not closed:
            # it has waited long enough: models whose queue is all that keeps them (nothing in
            # flight) go now; busy ones are closed, finish what they run, and go next time
            # a model loaded for its own waiters serves at least max_wait before it can be
            # closed, so that slow loads cannot make two models swap per request
            served = [m for m in staying if m.evictable and not m.pinned
                      and (m.idle or m.batch_over(now, max_wait))]
            free = victim_order([m for m in served if m.in_flight == 0])
            victims = _room(staying, free, model.required, budget, max_loaded)
            if victims is None:
                busy = victim_order(served)
                in_way = _room(staying, busy, model.required, budget, max_loaded)
                if in_way is not None:
                    closed.update(m.name for m in in_way if m.in_flight > 0)
                waiting.append((model.name, f"waited {waited:.1f} s "
                                f"(max_wait {max_wait:g} s): draining "
                                f"{', '.join(sorted(closed)) or 'nothing yet'}"))
                continue
            reason = (f"waited {waited:.1f} s (max_wait {max_wait:g} s); "
                      + (f"unloading {', '.join(v.name for v in victims)}" if victims
                         else "fits"))
            cause = "max_wait" if victims else "fits"
        elif victims is None:
            waiting.append((model.name, _limit(staying, model.required, budget, max_loaded)
                            + "; the models holding it are busy"))
            continue
        else:
            reason = (f"unloading idle {', '.join(v.name for v in victims)}" if victims
                      else "fits")
            cause = "idle" if victims else "fits"
        loads.append(Load(model.name, tuple(v.name for v in victims), reason, cause))
        taken.update(v.name for v in victims)
        holding.append(model)
    return Schedule(tuple(loads), frozenset(closed), tuple(refused), tuple(waiting))
