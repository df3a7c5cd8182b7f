"""A model's request rules in lalo.yaml: `defaults`, `set`, `limits` and `strip` of the sampling
and length parameters, validated, and the `RequestRules` the proxy applies
(launcher.proxy.params). Names are llama-server's (OpenAI's where they agree)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from launcher.config.fields import Section

ParamName = Literal[
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty",
    "repeat_last_n", "presence_penalty", "frequency_penalty", "dry_multiplier",
    "xtc_probability", "xtc_threshold", "mirostat", "mirostat_tau", "mirostat_eta", "seed", "stop",
]
# parameters whose values are whole numbers (their limits too)
INTEGER_PARAMS = frozenset({"max_tokens", "top_k", "repeat_last_n", "mirostat", "seed"})

_Unit = Annotated[float, Field(ge=0, le=1)]


class RequestParams(Section):
    """Values of `defaults` and `set`; ranges are the ones llama-server accepts."""

    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: _Unit | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: _Unit | None = None
    typical_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: Annotated[int, Field(ge=-1)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    dry_multiplier: Annotated[float, Field(ge=0)] | None = None
    xtc_probability: _Unit | None = None
    xtc_threshold: _Unit | None = None
    mirostat: Annotated[int, Field(ge=0, le=2)] | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    seed: Annotated[int, Field(ge=-1, le=2**32 - 1)] | None = None  # -1: random
    stop: str | Annotated[tuple[str, ...], Field(strict=False, max_length=16)] | None = None

    def given(self) -> dict[str, Any]:
        """The parameters the YAML gave (a null is not given)."""
        return {name: value for name in self.model_fields_set
                if (value := getattr(self, name)) is not None}


class Bounds(Section):
    """One parameter's range in `limits`: `{min, max}`, either one; a bare number is the max."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _order(self) -> Bounds:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both (or just a number: the max)")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        return self

    def holds(self, value: float) -> bool:
        return ((self.min is None or value >= self.min)
                and (self.max is None or value <= self.max))

    def describe(self) -> str:
        parts = [f"{word} {bound:g}" for word, bound in (("min", self.min), ("max", self.max))
                 if bound is not None]
        return ", ".join(parts)


class Limits(Section):
    """`limits`: the numeric parameters that can be bounded."""

    max_tokens: Bounds | None = None
    temperature: Bounds | None = None
    top_p: Bounds | None = None
    top_k: Bounds | None = None
    min_p: Bounds | None = None
    typical_p: Bounds | None = None
    repeat_penalty: Bounds | None = None
    repeat_last_n: Bounds | None = None
    presence_penalty: Bounds | None = None
    frequency_penalty: Bounds | None = None
    dry_multiplier: Bounds | None = None
    xtc_probability: Bounds | None = None
    xtc_threshold: Bounds | None = None
    mirostat_tau: Bounds | None = None
    mirostat_eta: Bounds | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _bare_max(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return {"max": value}
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"must be a number (the max) or {{min: A, max: B}}, got {value!r}")
        return value

    @field_validator("max_tokens", "top_k", "repeat_last_n")
    @classmethod
    def _whole(cls, bounds: Bounds | None) -> Bounds | None:
        if bounds is not None and any(bound is not None and bound != int(bound)
                                      for bound in (bounds.min, bounds.max)):
            raise ValueError(f"must be whole numbers, got {bounds.describe()}")
        return bounds

    def given(self) -> dict[str, Bounds]:
        return {name: value for name in self.model_fields_set
                if (value := getattr(self, name)) is not None}


@dataclass(frozen=True)
class RequestRules:
    """What the proxy does to a request's parameters: strip, then defaults, limits, set."""

    defaults: Mapping[str, Any]
    set: Mapping[str, Any]
    limits: Mapping[str, tuple[float | None, float | None]]  # (min, max)
    strip: frozenset[str]

    def __bool__(self) -> bool:
        return bool(self.defaults or self.set or self.limits or self.strip)


def request_rules(defaults: RequestParams, forced: RequestParams, limits: Limits,
                  strip: tuple[str, ...]) -> RequestRules:
    """The rules of one model, checked for contradictions (ValueError says which)."""
    given_defaults, given_set, given_limits = defaults.given(), forced.given(), limits.given()
    for name in strip:
        for section, names in (("defaults", given_defaults), ("set", given_set),
                               ("limits", given_limits)):
            if name in names:
                raise ValueError(f"strip removes {name}, which {section}.{name} gives: keep one")
    for section, values in (("defaults", given_defaults), ("set", given_set)):
        for name, value in values.items():
            bounds = given_limits.get(name)
            if bounds is not None and not bounds.holds(value):
                raise ValueError(f"{section}.{name}: {value:g} is outside limits.{name} "
                                 f"({bounds.describe()})")
    return RequestRules(
        defaults=_json_values(given_defaults), set=_json_values(given_set),
        limits={name: (_number(b.min, name), _number(b.max, name))
                for name, b in given_limits.items()},
        strip=frozenset(strip))


def _json_values(values: dict[str, Any]) -> dict[str, Any]:
    return {name: list(value) if isinstance(value, tuple) else value
            for name, value in values.items()}


def _number(bound: float | None, name: str) -> float | None:
    if bound is None:
        return None
    return int(bound) if name in INTEGER_PARAMS else bound
