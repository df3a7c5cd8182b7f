"""A bundle's models: where each comes from, its licence, the licence gate's decision, and the
GGUF file itself (catalog models come from the hub cache, pulled first when missing).

The gate runs before anything is downloaded or copied: a refused model stops the build.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from launcher.config import ModelConfig
from launcher.errors import ConfigError, LicenseError
from launcher.models.catalog import Catalog, cached_entry_path, default_catalog, pull_entry
from launcher.models.catalog_entry import CatalogEntry
from launcher.models.hub import HubClient
from launcher.models.licenses import LicenseDecision, canonical_id, check_redistribution, lookup
from launcher.packaging.spec import BundleSpec

Report = Callable[[str], None]


@dataclass(frozen=True)
class ModelLicense:
    """A model's licence as the NOTICE needs it."""

    id: str | None
    name: str | None
    url: str | None
    source: str | None  # where it was read (model card URL, or the spec)
    custom: bool  # not an SPDX licence: terms of its own

    @property
    def display(self) -> str:
        if self.id is None:
            return "no licence recorded"
        return f"{self.name} ({self.id})" if self.name and self.name != self.id else self.id


@dataclass(frozen=True)
class ModelInput:
    """One model of a bundle spec; `path` is None until fetch_models found the file."""

    name: str
    config: ModelConfig
    catalog: CatalogEntry | None
    license: ModelLicense
    decision: LicenseDecision
    path: Path | None

    @property
    def label(self) -> str:
        """How messages name it: `liquid-tool (catalog lfm2-1.2b-tool)`."""
        if self.catalog is not None:
            return f"{self.name} (catalog {self.catalog.id})"
        return f"{self.name} ({self.config.file})"

    @property
    def file_name(self) -> str:
        """The GGUF's own name: the hub file's, or the local file's."""
        if self.catalog is not None:
            return self.catalog.file.rsplit("/", 1)[-1]
        assert self.config.file is not None
        return Path(self.config.file).name

    def require_path(self) -> Path:
        if self.path is None:
            raise ConfigError(f"models.{self.name}: no model file (not fetched)")
        return self.path


def model_inputs(spec: BundleSpec, catalog: Catalog | None = None) -> list[ModelInput]:
    """Every model of the spec with its licence and gate decision (no file access)."""
    entries = catalog
    inputs: list[ModelInput] = []
    for name, model in spec.models.items():
        entry: CatalogEntry | None = None
        path: Path | None = None
        if model.catalog is not None:
            entries = entries if entries is not None else default_catalog()
            if model.catalog not in entries:
                raise ConfigError(
                    f"{spec.source}: models.{name}.catalog: unknown catalog model "
                    f"{model.catalog!r}; known: {', '.join(entries.entries)}"
                )
            entry = entries.get(model.catalog)
            license_ = _catalog_license(spec, name, model, entry)
        else:
            assert model.file is not None
            path = spec.path(model.file)
            license_ = _file_license(model)
        decision = check_redistribution(
            _gate_label(name, entry), license_.id, spec.fields.licenses.allow
        )
        inputs.append(ModelInput(name, model, entry, license_, decision, path))
    return inputs


def _gate_label(name: str, entry: CatalogEntry | None) -> str:
    return f"{name} (catalog {entry.id})" if entry is not None else name


def _catalog_license(
    spec: BundleSpec, name: str, model: ModelConfig, entry: CatalogEntry
) -> ModelLicense:
    info = entry.license
    if model.license is not None and canonical_id(model.license) != canonical_id(info.id):
        raise ConfigError(
            f"{spec.source}: models.{name}.license: the catalog records {info.id!r} for "
            f"{entry.id}; a spec cannot relicense it (remove `license`)"
        )
    known = lookup(info.id)
    return ModelLicense(
        id=canonical_id(info.id),
        name=info.display_name,
        url=info.link,
        source=info.source,
        custom=known is None or not known.spdx,
    )


def _file_license(model: ModelConfig) -> ModelLicense:
    if model.license is None:
        return ModelLicense(None, None, None, None, custom=False)
    known = lookup(model.license)
    return ModelLicense(
        id=canonical_id(model.license),
        name=known.name if known else None,
        url=known.url if known else None,
        source="the bundle spec",
        custom=known is None or not known.spdx,
    )


def gate(models: Sequence[ModelInput]) -> list[LicenseDecision]:
    """The licence gate: every decision, or LicenseError naming each refused model and why."""
    refused = [m.decision for m in models if not m.decision.allowed]
    if refused:
        if len(refused) == 1:
            raise LicenseError(f"licence gate: {refused[0].reason}")
        lines = "\n".join(f"  {d.reason}" for d in refused)
        raise LicenseError(f"licence gate refused {len(refused)} models:\n{lines}")
    return [m.decision for m in models]


def fetch_models(
    models: Sequence[ModelInput],
    report: Report,
    client: HubClient | None = None,
) -> list[ModelInput]:
    """Each model with its GGUF path: local files checked, catalog files from the hub cache
    (pulled when missing; offline that is a HubError naming the model)."""
    hub = client
    done: list[ModelInput] = []
    for model in models:
        if model.catalog is None:
            path = model.require_path()
            if not path.is_file():
                raise ConfigError(f"models.{model.name}.file: {path} does not exist")
            done.append(model)
            continue
        hub = hub if hub is not None else HubClient()
        cached = cached_entry_path(model.catalog, client=hub)
        if cached is not None:
            report(f"{model.name}: {model.catalog.id} from the {model.catalog.source_kind} cache")
            done.append(replace(model, path=cached))
            continue
        report(f"{model.name}: pulling {model.catalog.source_ref}")
        pulled = pull_entry(model.catalog, client=hub, show_progress=True)
        done.append(replace(model, path=pulled.path))
    return done
