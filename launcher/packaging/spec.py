"""Bundle specs (`bundles/NAME.yaml`): parsed once into a frozen BundleSpec; every mistake is a
ConfigError naming the file, line and YAML path, as `lalo.yaml` errors do.

`models`, `proxy`, `resources` and `supervisor` are validated by launcher.config (same keys as
lalo.yaml); `name`, `engine`, `targets`, `platforms`, `licenses`, `exe`, `image` and
`kubernetes` are the spec's own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from launcher.config import Config, ModelConfig, resolve_path, validate
from launcher.errors import ConfigError
from launcher.units import auto_or_size_field, size_field
from launcher.yamlfile import describe, read_yaml, where

SPEC_DIR = "bundles"
Target = Literal["llamafile", "bundle", "exe", "image", "k8s", "windows"]
# The default when a spec names none (image, k8s and windows are asked for by name).
TARGETS: tuple[Target, ...] = ("llamafile", "bundle", "exe")
Platform = Literal["linux", "macos", "windows"]
DEFAULT_EMBED_LIMIT = 2 * 1024**3
_CONFIG_KEYS = ("proxy", "resources", "supervisor", "models")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?$")
_REPOSITORY = re.compile(r"^[a-z0-9][a-z0-9._-]*(:[0-9]+)?(/[a-z0-9][a-z0-9._-]*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# The build host can check any RAM budget a client machine may have: do not compare with ours.
_ANY_RAM = 1 << 62


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LlamaServerSpec(_Section):
    """The llama-server the bundle and exe targets ship (built by `lalo engine build`)."""

    # portable: runs on other CPUs of this OS and architecture; native only by explicit choice.
    variant: Literal["native", "portable"] = "portable"


class LlamafileSpec(_Section):
    """The llamafile runtime the llamafile target prepends to each model."""

    runtime: str | None = None
    sha256: str | None = None
    version: str = "0.10"

    @field_validator("sha256")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.match(value):
            raise ValueError(f"must be 64 lowercase hex digits, got {value!r}")
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not _VERSION.match(value):
            raise ValueError(f"must look like 0.10 or 0.9.3, got {value!r}")
        return value


class EngineSpec(_Section):
    llama_server: LlamaServerSpec = LlamaServerSpec()
    llamafile: LlamafileSpec = LlamafileSpec()


class LicensesSpec(_Section):
    """Licence ids accepted beyond the default allow-list, and licence texts to ship."""

    allow: Annotated[tuple[str, ...], Field(strict=False)] = ()
    # licence id -> a file holding its full text (relative to the spec), for custom licences
    texts: Mapping[str, str] = Field(default_factory=dict)

    @field_validator("allow")
    @classmethod
    def _ids(cls, ids: tuple[str, ...]) -> tuple[str, ...]:
        for item in ids:
            if not item.strip():
                raise ValueError("licence ids must not be empty")
        return ids


class ExeSpec(_Section):
    """The single binary: models inside it (extracted at each start) or beside it."""

    models: Literal["auto", "embed", "beside"] = "auto"
    embed_limit: int = DEFAULT_EMBED_LIMIT

    @field_validator("embed_limit", mode="before")
    @classmethod
    def _limit(cls, value: Any) -> int:
        return size_field(value)


class ImageSpec(_Section):
    """The OCI image (`--target image`): models inside it, or read from a volume at run time."""

    models: Literal["embed", "volume"] = "embed"
    # where the `volume` mode (and the k8s PersistentVolumeClaim) mounts the models
    models_dir: str = "/models"
    # the image's name in `podman load` and the k8s Deployment (tag: lalo's version by default)
    repository: str | None = None
    tag: str | None = None

    @field_validator("models_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or value.rstrip("/") in ("", "/app") or ".." in value:
            raise ValueError(f"must be an absolute path other than / and /app, got {value!r}")
        return value.rstrip("/")

    @field_validator("repository")
    @classmethod
    def _repository(cls, value: str | None) -> str | None:
        if value is not None and not _REPOSITORY.match(value):
            raise ValueError(f"must be an image repository like registry.example/team/name, "
                             f"got {value!r}")
        return value

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str | None) -> str | None:
        if value is not None and not _TAG.match(value):
            raise ValueError(f"must match {_TAG.pattern}, got {value!r}")
        return value


class KubernetesSpec(_Section):
    """The kustomize base (`--target k8s`); memory comes from lalo's estimates, not from here."""

    namespace: str | None = None
    replicas: Annotated[int, Field(ge=0, le=100)] = 1
    # NVIDIA GPUs per pod (`nvidia.com/gpu` request and limit); 0: CPU only
    gpus: Annotated[int, Field(ge=0, le=64)] = 0
    # the models PersistentVolumeClaim: `auto` = the models' size plus a quarter, in whole GiB
    storage: int | Literal["auto"] = "auto"
    storage_class: str | None = None
    # CPUs requested per model whose `threads` is `auto` (lalo cannot know the node's cores)
    cpus_per_auto_model: Annotated[int, Field(ge=1, le=256)] = 2

    @field_validator("storage", mode="before")
    @classmethod
    def _storage(cls, value: Any) -> int | str:
        return auto_or_size_field(value)

    @field_validator("namespace")
    @classmethod
    def _dns_label(cls, value: str | None) -> str | None:
        if value is not None and not _DNS_LABEL.match(value):
            raise ValueError(f"must be a DNS label (lowercase letters, digits, '-'), got {value!r}")
        return value

    @field_validator("storage_class")
    @classmethod
    def _dns_name(cls, value: str | None) -> str | None:
        if value is not None and not all(_DNS_LABEL.match(p) for p in value.split(".")):
            raise ValueError(f"must be a DNS name (lowercase letters, digits, '-', '.'), "
                             f"got {value!r}")
        return value


class SpecFields(_Section):
    """The spec's own keys (the lalo.yaml sections are validated by launcher.config)."""

    name: str
    engine: EngineSpec = EngineSpec()
    targets: Annotated[tuple[Target, ...], Field(strict=False, min_length=1)] = TARGETS
    # Where clients run the outputs; Windows ones get the llamafile size/name warnings.
    platforms: Annotated[tuple[Platform, ...], Field(strict=False, min_length=1)] = (
        "linux", "macos", "windows",
    )
    licenses: LicensesSpec = LicensesSpec()
    exe: ExeSpec = ExeSpec()
    image: ImageSpec = ImageSpec()
    kubernetes: KubernetesSpec = KubernetesSpec()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"must match {_NAME.pattern} (it names files), got {value!r}")
        return value

    @field_validator("targets", "platforms")
    @classmethod
    def _unique(cls, items: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(items)) != len(items):
            raise ValueError(f"lists an item twice: {list(items)}")
        return items


@dataclass(frozen=True)
class BundleSpec:
    """A validated bundle spec and where it came from (relative paths start at its folder)."""

    fields: SpecFields
    config: Config
    source: Path
    text: str

    @property
    def name(self) -> str:
        return self.fields.name

    @property
    def base_dir(self) -> Path:
        return self.source.parent

    @property
    def models(self) -> Mapping[str, ModelConfig]:
        return self.config.models

    def path(self, text: str) -> Path:
        """A path from the spec, relative to the spec's folder; `~` and `$VAR` expanded."""
        return resolve_path(text, self.base_dir)

    def image_reference(self) -> str:
        """The image's name and tag: `localhost/NAME:LALO_VERSION` unless the spec says."""
        from launcher import __version__

        image = self.fields.image
        return f"{image.repository or f'localhost/{self.name}'}:{image.tag or __version__}"

    def require_fixed_contexts(self, target: str, why: str) -> None:
        """Targets that size memory at build time (`why`) need every context as a number."""
        for name, model in self.models.items():
            if model.ctx_auto:
                raise ConfigError(
                    f"{self.source}: models.{name}.ctx_size: auto is decided by lalo on the "
                    f"machine it runs on; the {target} target needs a number ({why}): set ctx_size")

    def llamafile_runtime(self) -> Path | None:
        runtime = self.fields.engine.llamafile.runtime
        return self.path(runtime) if runtime is not None else None


def find_spec(name_or_path: str, cwd: Path | None = None) -> Path:
    """SPEC as given: an existing path, else `bundles/SPEC.yaml` under the current folder."""
    base = cwd if cwd is not None else Path.cwd()
    given = Path(name_or_path).expanduser()
    candidates = [given if given.is_absolute() else base / given]
    if "/" not in name_or_path and not name_or_path.endswith((".yaml", ".yml")):
        candidates.append(base / SPEC_DIR / f"{name_or_path}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"no bundle spec {name_or_path!r} (looked for {looked})")


def load_spec(name_or_path: str, cwd: Path | None = None) -> BundleSpec:
    path = find_spec(name_or_path, cwd)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    return parse_spec(text, source=path)


def parse_spec(text: str, *, source: Path) -> BundleSpec:
    """YAML text of a spec to a BundleSpec; errors carry `file:line: path: message`."""
    label = str(source)
    data, lines = read_yaml(text, label)
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: a bundle spec must be a mapping with `name` and `models`")
    known = (*SpecFields.model_fields, *_CONFIG_KEYS)
    for key in data:
        if key not in known:
            raise ConfigError(
                f"{where(label, lines, (str(key),))}{key}: unknown key (known keys: "
                f"{', '.join(known)})"
            )
    own = {key: value for key, value in data.items() if key in SpecFields.model_fields}
    try:
        fields = SpecFields.model_validate(own)
    except ValidationError as exc:
        raise ConfigError(describe(exc, label, lines, SpecFields)) from None
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"{where(label, lines, ('models',))}models: must name at least one model")
    config = validate(
        {key: data[key] for key in _CONFIG_KEYS if key in data},
        label=label, total_ram=_ANY_RAM, lines=lines,
    )
    spec = BundleSpec(fields=fields, config=config, source=source.resolve(), text=text)
    _check_models(spec, label, lines)
    return spec


def _check_models(spec: BundleSpec, label: str, lines: Mapping[tuple[str, ...], int]) -> None:
    for name, model in spec.models.items():
        path = ("models", name)
        if model.engine_kind == "llama-cpp-python":
            raise ConfigError(
                f"{where(label, lines, (*path, 'engine'))}models.{name}.engine: bundles run "
                "llama-server (or llamafile); llama-cpp-python cannot be packaged"
            )
        if model.file is not None and not model.file.endswith(".gguf"):
            raise ConfigError(
                f"{where(label, lines, (*path, 'file'))}models.{name}.file: must be a .gguf "
                f"file (the packager adds the engine), got {model.file!r}"
            )
