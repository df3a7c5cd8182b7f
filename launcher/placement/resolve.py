"""From config entries to models with their facts and memory estimates (the planner's input)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.config import LoadedConfig, ModelConfig
from launcher.errors import ConfigError, GGUFError
from launcher.models.gguf_file import GGUFInfo, read_gguf
from launcher.models.shape import ModelFacts
from launcher.placement.estimate import MemoryEstimate, MemorySettings, estimate_for
from launcher.placement.planner import Candidate

if TYPE_CHECKING:  # the catalog brings the hub client: imported only when a model uses it
    from launcher.models.catalog import CatalogResolver


def catalog_for(loaded: LoadedConfig) -> CatalogResolver | None:
    """The catalog resolver, imported only when a model uses `catalog:` (it brings the hub client)."""
    if not any(model.catalog for model in loaded.config.models.values()):
        return None
    from launcher.models.catalog import catalog_resolver

    return catalog_resolver()


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    config: ModelConfig
    path: Path | None  # None: a catalog model not downloaded yet
    info: GGUFInfo | None
    facts: ModelFacts | None
    estimate: MemoryEstimate | None
    measured: int | None = None  # RSS measured on an earlier load with the same file and settings
    error: str | None = None  # the file is unusable (not a GGUF, truncated): never started
    ctx_note: str | None = None  # how `ctx_size: auto` was decided (placement/context.py)

    @property
    def required(self) -> int:
        if self.measured is not None:
            return self.measured
        return self.estimate.total if self.estimate is not None else 0

    def candidate(self) -> Candidate:
        return Candidate(
            name=self.name,
            required=self.required,
            preload=self.config.preload,
            measured=self.measured is not None,
            facts=self.facts,
            ctx_size=self.config.ctx_size,
            parallel=self.config.parallel,
            invalid=self.error,
            settings=MemorySettings.of(self.config),
            ctx_note=self.ctx_note,
        )


def resolve_model(
    loaded: LoadedConfig,
    name: str,
    *,
    catalog: CatalogResolver | None = None,
    measured: Mapping[str, int] | None = None,
) -> ResolvedModel:
    model = loaded.config.models[name]
    info: GGUFInfo | None = None
    if model.file is not None:
        path: Path | None = loaded.model_path(name)
        assert path is not None
        try:
            info = read_gguf_model(path)
        except GGUFError as exc:
            # one broken file must not keep the other models from running
            return ResolvedModel(name=name, config=model, path=path, info=None, facts=None,
                                 estimate=None, error=str(exc))
        facts = ModelFacts.from_gguf(info)
    else:
        if catalog is None:
            raise ConfigError(f"models.{name}.catalog: catalog models are not available here")
        path, catalog_facts = catalog(name, model)
        if path is not None:
            info = read_gguf_model(path)
            facts = ModelFacts.from_gguf(info)
        elif catalog_facts is not None:
            facts = catalog_facts
        else:
            raise ConfigError(f"models.{name}.catalog: {model.catalog!r} has no file and no facts")
    estimate = estimate_for(facts, MemorySettings.of(model))
    return ResolvedModel(
        name=name,
        config=model,
        path=path,
        info=info,
        facts=facts,
        estimate=estimate,
        measured=(measured or {}).get(name),
    )


def resolve_models(
    loaded: LoadedConfig,
    *,
    catalog: CatalogResolver | None = None,
    measured: Mapping[str, int] | None = None,
) -> list[ResolvedModel]:
    return [
        resolve_model(loaded, name, catalog=catalog, measured=measured)
        for name in loaded.config.models
    ]


def read_gguf_model(path: Path) -> GGUFInfo:
    """The GGUF facts of a model file (a plain .gguf; llamafiles hold theirs inside)."""
    return read_gguf(path)
