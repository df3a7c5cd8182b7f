"""The model catalog (`catalog.yaml`): validated, frozen entries with where each model comes
from (the hub, or wheels on a package index), licence and the architecture facts that let lalo
estimate memory before anything is downloaded.

`catalog_resolver()` is the `CatalogResolver` that `resolve_models` takes: a config entry
`catalog: ID` becomes the cached GGUF (or None while it is not downloaded) and its facts.
`cached_entry_path` and `pull_entry` are the one place that picks the hub or the wheel store.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from launcher.config import LoadedConfig, ModelConfig
from launcher.errors import ConfigError, HubError, UsageError
from launcher.models.download import ProgressCallback
from launcher.models.facts import catalog_facts
from launcher.models.hub import HubClient, HubFile, PullResult
from launcher.models.licenses import lookup
from launcher.models.shape import QUANT_BITS, ModelFacts
from launcher.models.wheels import (
    LineCallback,
    PhaseProgress,
    WheelPullResult,
    WheelSource,
    WheelStore,
    progress_printer,
    stderr_line,
)
from launcher.yamlfile import read_yaml, where

# name -> (path of the GGUF to load, or None when not available yet, facts when known without a file)
CatalogResolver = Callable[[str, ModelConfig], tuple[Path | None, ModelFacts | None]]

CATALOG_ENV = "LALO_CATALOG"  # another catalog file instead of the packaged one
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# name==version, as pip takes it (PEP 508 name, an exact version: pulls must be reproducible)
_WHEEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?==[A-Za-z0-9][A-Za-z0-9.+!_-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LicenseInfo(_Strict):
    """An SPDX id, or a custom licence's id (as the hub names it) with its name and URL."""

    id: str
    name: str | None = None
    url: str | None = None
    source: str  # where the licence was read (the model card)

    @model_validator(mode="after")
    def _custom_needs_name(self) -> LicenseInfo:
        known = lookup(self.id)
        if (known is None or not known.spdx) and not (self.name and self.url):
            raise ValueError(f"custom licence {self.id!r} needs `name` and `url`")
        return self

    @property
    def display_name(self) -> str:
        known = lookup(self.id)
        return self.name or (known.name if known else self.id)

    @property
    def link(self) -> str | None:
        known = lookup(self.id)
        return self.url or (known.url if known else None)


class Architecture(_Strict):
    """The config.json facts that decide memory and speed."""

    name: str
    parameters: Annotated[int, Field(gt=0)]
    n_layer: Annotated[int, Field(gt=0)]
    n_embd: Annotated[int, Field(gt=0)]
    n_ff: Annotated[int, Field(gt=0)]
    n_head: Annotated[int, Field(gt=0)]
    n_head_kv: Annotated[int, Field(gt=0)]
    head_dim: Annotated[int, Field(gt=0)]
    n_vocab: Annotated[int, Field(gt=0)]
    n_ctx_train: Annotated[int, Field(gt=0)]
    # a BPE tokenizer's merges (tokenizer.json's `merges`; 0: SentencePiece, or not read yet)
    n_merges: Annotated[int, Field(ge=0)] = 0
    # Hybrid models (lfm2): the layers with attention; the others are short convolutions.
    attention_layers: Annotated[tuple[int, ...], Field(strict=False)] | None = None
    conv_l_cache: Annotated[int, Field(gt=0)] | None = None
    # Sliding-window attention (Gemma 2/3...): the window in tokens, and the layers that attend
    # to the whole context (every other layer keeps KV for its window only).
    sliding_window: Annotated[int, Field(gt=0)] | None = None
    global_layers: Annotated[tuple[int, ...], Field(strict=False)] | None = None

    @model_validator(mode="after")
    def _layers(self) -> Architecture:
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv})")
        for layer in self.attention_layers or ():
            if not 0 <= layer < self.n_layer:
                raise ValueError(f"attention_layers: {layer} is not a layer of a {self.n_layer}-layer model")
        if (self.attention_layers is None) != (self.conv_l_cache is None):
            raise ValueError("attention_layers and conv_l_cache go together (hybrid models)")
        if (self.sliding_window is None) != (self.global_layers is None):
            raise ValueError("sliding_window and global_layers go together (sliding-window models)")
        for layer in self.global_layers or ():
            if not 0 <= layer < self.n_layer:
                raise ValueError(f"global_layers: {layer} is not a layer of a {self.n_layer}-layer model")
        return self

    def swa_layers(self) -> tuple[bool, ...]:
        """Per layer, whether it uses the sliding window (empty: no sliding window)."""
        if self.global_layers is None:
            return ()
        full = set(self.global_layers)
        return tuple(i not in full for i in range(self.n_layer))

    def kv_heads(self) -> tuple[int, ...]:
        if self.attention_layers is None:
            return (self.n_head_kv,) * self.n_layer
        with_attention = set(self.attention_layers)
        return tuple(self.n_head_kv if i in with_attention else 0 for i in range(self.n_layer))


class Weights(_Strict):
    """The file's tensor table in brief, once the file has been read: what the estimate takes
    from a GGUF (`lalo inspect FILE --json` prints it as `catalog_weights`)."""

    bytes: Annotated[int, Field(gt=0)]  # tensor data: the file less its header and vocabulary
    # matrix-multiply weights by tensor type (what a CPU may repack into a second copy)
    matmul: Annotated[Mapping[str, Annotated[int, Field(ge=0)]], Field(strict=False)]
    input: Annotated[int, Field(ge=0)]  # the input layer (token embedding...), always in RAM
    output: Annotated[int, Field(ge=0)]  # the output layer (a tied one is the embedding again)
    tied: bool


class CatalogEntry(_Strict):
    """One model file on the hub and what lalo knows of it without downloading it."""

    id: str
    name: str
    # where it comes from: the hub (repo, file, revision) or wheels (wheels, members, sha256;
    # `file` is then the joined file's name)
    repo: str | None = None
    file: str
    revision: str | None = None
    wheels: Annotated[tuple[str, ...], Field(strict=False)] | None = None
    members: Annotated[tuple[str, ...], Field(strict=False)] | None = None
    file_type: str
    size: Annotated[int, Field(gt=0)]
    size_exact: bool = False
    sha256: str | None = None
    license: LicenseInfo
    base_model: str
    purpose: str
    context: Annotated[int, Field(gt=0)]
    default_ctx: Annotated[int, Field(ge=128)]
    bench_shape: str | None = None
    architecture: Architecture
    weights: Weights | None = None  # None: not read yet (the file's size stands in)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError(f"must match {_ID.pattern}")
        return value

    @field_validator("repo", "base_model")
    @classmethod
    def _repo(cls, value: str | None) -> str | None:
        if value is not None and not _REPO.match(value):
            raise ValueError("must be a hub repository id such as Owner/Name")
        return value

    @field_validator("wheels")
    @classmethod
    def _wheels(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("must name at least one wheel")
        for item in value:
            if not _WHEEL.match(item):
                raise ValueError(f"{item!r} is not name==version (an exact version)")
        return value

    @field_validator("members")
    @classmethod
    def _members(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("must name at least one member")
        for item in value:
            if not item or item.startswith("/") or ".." in item.split("/"):
                raise ValueError(f"{item!r} is not a relative path inside a wheel")
        return value

    @field_validator("file")
    @classmethod
    def _file(cls, value: str) -> str:
        if not value.endswith(".gguf") or value.startswith("/") or ".." in value.split("/"):
            raise ValueError("must be a relative .gguf path inside the repository")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.match(value):
            raise ValueError("must be 64 lowercase hex digits")
        return value

    @field_validator("file_type")
    @classmethod
    def _file_type(cls, value: str) -> str:
        if value not in QUANT_BITS:
            raise ValueError(f"must be one of {', '.join(QUANT_BITS)}")
        return value

    @model_validator(mode="after")
    def _ctx(self) -> CatalogEntry:
        if self.default_ctx > self.context:
            raise ValueError(f"default_ctx {self.default_ctx} is above the model's context {self.context}")
        hub = self.repo is not None or self.revision is not None
        wheel = self.wheels is not None or self.members is not None
        if hub == wheel:
            raise ValueError("give either repo + revision (the hub) or wheels + members (a package index)")
        if hub and (self.repo is None or self.revision is None):
            raise ValueError("a hub model needs both `repo` and `revision`")
        if wheel:
            if self.wheels is None or self.members is None:
                raise ValueError("a wheel model needs both `wheels` and `members`")
            if self.sha256 is None:
                raise ValueError("a wheel model needs the `sha256` of the joined file")
            if "/" in self.file:
                raise ValueError("file: a wheel model's `file` is the joined file's name, without folders")
        return self

    @property
    def source_kind(self) -> str:
        """`hub` or `wheels`."""
        return "wheels" if self.wheels is not None else "hub"

    @property
    def source_ref(self) -> str:
        """Where the file comes from, in one line (for messages)."""
        if self.wheels is not None:
            return "wheels " + ", ".join(self.wheels)
        return f"{self.repo}/{self.file}"

    @property
    def pinned(self) -> bool:
        """Whether the source is immutable: a hub commit, or exact wheel versions with a sha256."""
        if self.wheels is not None:
            return True
        return bool(self.revision and _COMMIT.match(self.revision))

    def hub_file(self, revision: str | None = None) -> HubFile:
        if self.repo is None or self.revision is None:
            raise UsageError(f"{self.id} comes from wheels ({', '.join(self.wheels or ())}), not the hub")
        size = self.size if self.size_exact else None
        return HubFile(
            repo=self.repo,
            filename=self.file,
            revision=revision or self.revision,
            sha256=self.sha256 if revision is None else None,
            size=size,
        )

    def wheel_source(self) -> WheelSource:
        if self.wheels is None or self.members is None or self.sha256 is None:
            raise UsageError(f"{self.id} comes from the hub ({self.repo}), not from wheels")
        return WheelSource(
            filename=self.file,
            wheels=self.wheels,
            members=self.members,
            sha256=self.sha256,
            size=self.size if self.size_exact else None,
        )

    def facts(self) -> ModelFacts:
        """Facts for memory estimates before the file exists (launcher.models.facts)."""
        return catalog_facts(self)


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
        entries = catalog if catalog is not None else default_catalog()
        assert model.catalog is not None
        if model.catalog not in entries:
            raise ConfigError(
                f"models.{name}.catalog: unknown catalog model {model.catalog!r}; known: "
                f"{', '.join(entries.entries)}"
            )
        entry = entries.get(model.catalog)
        return cached_entry_path(entry, client=client, store=store), entry.facts()

    return resolve


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
        if model.catalog not in entries:
            raise ConfigError(
                f"models.{name}.catalog: unknown catalog model {model.catalog!r}; "
                f"known: {', '.join(entries.entries)}"
            )
        entry = entries.get(model.catalog)
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
