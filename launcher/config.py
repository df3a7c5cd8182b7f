"""`lalo.yaml`: found in a fixed lookup order, parsed once into frozen, validated models.

Every problem is a ConfigError naming the YAML path (and line when known), e.g.
`lalo.yaml:7: models.qwen.ctx_size: must be >= 128, got 0`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import psutil
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from launcher import paths
from launcher.engines.server_flags import offload_flag, refused_arg, refused_env
from launcher.errors import ConfigError
from launcher.units import auto_or_size_field, format_size, size_field
from launcher.yamlfile import Lines, describe, read_yaml, where

CONFIG_NAME = "lalo.yaml"
EngineKind = Literal["llama-server", "llamafile", "llama-cpp-python"]
# The KV cache types lalo offers (K and V alike): each halves the one before it, near enough
KvCacheType = Literal["f16", "q8_0", "q4_0"]
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
                        r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$")
_ORIGIN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]+$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_TEMPLATE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".tmpl", ".txt")


def _is_template_file(value: str) -> bool:
    """A chat_template that names a file rather than one of llama.cpp's built-in templates."""
    return "/" in value or "\\" in value or value.endswith(_TEMPLATE_SUFFIXES)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


ApiKeyRole = Literal["inference", "admin"]


class ApiKey(_Section):
    """One entry of proxy.api_keys: `inference` keys may use the model routes (and read the
    dashboard's status); `admin` keys may also load, unload, restart, reload and read activity
    and logs. A plain string in the YAML is an admin key named `key<N>` (its place, from 1)."""

    key: str
    name: str
    role: ApiKeyRole = "admin"

    @field_validator("key")
    @classmethod
    def _key(cls, key: str) -> str:
        if not key or key != key.strip() or any(ch.isspace() for ch in key):
            raise ValueError("api keys must be non-empty and have no spaces")
        return key

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(f"key name {name!r} must match {_NAME.pattern}")
        return name


class ActivityConfig(_Section):
    """The request history behind GET /api/activity and the dashboard's Activity list."""

    size: Annotated[int, Field(ge=1, le=1_000_000)] = 500  # requests kept in memory
    # also keep them in SQLite under lalo's state dir (activity.sqlite), at most this size
    store: bool = False
    store_max_size: int = 64 * 1024**2
    # keep request bodies and the end of each answer (debugging only: they hold user data)
    capture_bodies: bool = False

    @field_validator("store_max_size", mode="before")
    @classmethod
    def _store_max(cls, value: Any) -> int:
        size = size_field(value)
        if size < 1024**2:
            raise ValueError(f"must be >= 1MiB, got {value!r}")
        return size


class ProxyConfig(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    # a plain string (an admin key) or {key, name, role}
    api_keys: Annotated[tuple[ApiKey, ...], Field(strict=False)] = ()
    max_body_size: int = 16 * 1024**2
    queue_size: Annotated[int, Field(ge=0, le=100_000)] = 64
    upstream_timeout: Annotated[float, Field(gt=0)] = 600.0
    # Host names served besides localhost / loopback addresses while on loopback (DNS-rebinding
    # defence), e.g. ["lalo.internal", "*.example.lan"]
    allowed_hosts: Annotated[tuple[str, ...], Field(strict=False)] = ()
    # web page origins allowed to call lalo and read its answers (CORS); off when empty
    cors_origins: Annotated[tuple[str, ...], Field(strict=False)] = ()
    activity: ActivityConfig = ActivityConfig()

    @field_validator("max_body_size", mode="before")
    @classmethod
    def _body(cls, value: Any) -> int:
        size = size_field(value)
        if size < 1024:
            raise ValueError(f"must be >= 1KiB, got {value!r}")
        return size

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        for host in hosts:
            name = host[2:] if host.startswith("*.") else host
            if not _HOST_NAME.match(name):
                raise ValueError(f"{host!r} is not a host name (no scheme, port or path; "
                                 "'*.' may start a name)")
        return tuple(host.lower() for host in hosts)

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        for origin in origins:
            if origin in ("*", "null"):
                continue
            if not _ORIGIN.match(origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path), "
                                 "'*' or 'null'")
        return tuple(origin.lower() for origin in origins)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _plain_keys(cls, keys: Any) -> Any:
        if not isinstance(keys, list | tuple):
            return keys  # pydantic says what is wrong
        return [{"key": entry, "name": f"key{index}", "role": "admin"} if isinstance(entry, str)
                else entry for index, entry in enumerate(keys, start=1)]

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, keys: tuple[ApiKey, ...]) -> tuple[ApiKey, ...]:
        names = [entry.name for entry in keys]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two keys are named {name!r}: names label metrics, give "
                                 "each key its own")
        values = [entry.key for entry in keys]
        if len(set(values)) != len(values):
            raise ValueError("the same key is listed twice")
        return keys


class ResourcesConfig(_Section):
    ram_budget: int | Literal["auto"] = "auto"
    ram_reserve: int = 1024**3
    max_loaded: Annotated[int, Field(ge=0)] = 0
    # seconds a request may wait behind other models' batches before those drain for it
    max_wait: Annotated[float, Field(ge=0, le=86_400)] = 10.0
    prompt_cache_size: int = 2 * 1024**3  # disk for saved prompt caches, all models together

    @field_validator("ram_budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> int | str:
        return auto_or_size_field(value)

    @field_validator("ram_reserve", mode="before")
    @classmethod
    def _reserve(cls, value: Any) -> int:
        return size_field(value)

    @field_validator("prompt_cache_size", mode="before")
    @classmethod
    def _prompt_cache_size(cls, value: Any) -> int:
        return size_field(value)


class LlamaServerEngineConfig(_Section):
    path: str = "auto"
    variant: Literal["native", "portable", "cuda"] = "native"


class LlamafileEngineConfig(_Section):
    runtime: str | None = None


class LlamaCppPythonEngineConfig(_Section):
    python: str = "auto"


class EnginesConfig(_Section):
    llama_server: LlamaServerEngineConfig = LlamaServerEngineConfig()
    llamafile: LlamafileEngineConfig = LlamafileEngineConfig()
    llama_cpp_python: LlamaCppPythonEngineConfig = LlamaCppPythonEngineConfig()


class SupervisorConfig(_Section):
    load_timeout: Annotated[float, Field(gt=0)] = 120.0
    health_interval: Annotated[float, Field(gt=0)] = 2.0
    liveness_timeout: Annotated[float, Field(gt=0)] = 10.0
    stop_timeout: Annotated[float, Field(gt=0)] = 10.0
    max_failures: Annotated[int, Field(ge=1)] = 5
    stable_after: Annotated[float, Field(gt=0)] = 60.0
    backoff_initial: Annotated[float, Field(gt=0)] = 1.0
    backoff_max: Annotated[float, Field(gt=0)] = 30.0


class ModelConfig(_Section):
    file: str | None = None
    catalog: str | None = None
    engine: EngineKind | None = None
    ctx_size: Annotated[int, Field(ge=128, le=4_194_304)] = 2048
    threads: int | Literal["auto"] = "auto"
    parallel: Annotated[int, Field(ge=1, le=256)] = 1
    preload: bool = True
    pinned: bool = False  # never evicted to make room for another model
    ttl: Annotated[float, Field(ge=0)] = 0.0
    aliases: Annotated[tuple[str, ...], Field(strict=False)] = ()
    args: Annotated[tuple[str, ...], Field(strict=False)] = ()
    env: Mapping[str, str] = Field(default_factory=dict)
    license: str | None = None
    embeddings: bool = False
    load_timeout: Annotated[float, Field(gt=0)] | None = None
    # a Jinja template file (relative to this config), or the name of one built into llama.cpp
    chat_template: str | None = None
    sleep_after: Annotated[int, Field(ge=0, le=31_536_000)] = 0  # llama-server only; 0 = never
    prompt_cache: bool = True  # llama-server only: save cached prompts on stop, restore on start
    # llama-server on a GPU machine: auto = lalo's GPU plan (-ngl/--tensor-split), fit = leave
    # it to llama-server's --fit, N = that many layers (see docs/gpu.md)
    gpu_layers: int | Literal["auto", "fit"] = "auto"
    # llama-server's -ctk/-ctv for K and V (with -fa on for a quantized one): q8_0 about halves the
    # context's memory, q4_0 about quarters it (docs/memory-estimate.md)
    kv_cache: KvCacheType = "f16"

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, value: Any) -> int | str:
        if value == "auto":
            return "auto"
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
            raise ValueError(f"must be 'auto' or an integer from 1 to 1024, got {value!r}")
        return value

    @field_validator("gpu_layers", mode="before")
    @classmethod
    def _gpu_layers(cls, value: Any) -> int | str:
        if value in ("auto", "fit"):
            return str(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10_000:
            raise ValueError(f"must be 'auto', 'fit' or a number of layers from 0 to 10000, "
                             f"got {value!r}")
        return value

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, aliases: tuple[str, ...]) -> tuple[str, ...]:
        for alias in aliases:
            if not _NAME.match(alias):
                raise ValueError(f"alias {alias!r} must match {_NAME.pattern}")
        return aliases

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str | None) -> str | None:
        if value is not None and not _is_template_file(value) and not _TEMPLATE_NAME.match(value):
            raise ValueError(f"must be a template file (.jinja) or a llama.cpp template name "
                             f"such as chatml or llama3, got {value!r}")
        return value

    @model_validator(mode="after")
    def _source(self) -> ModelConfig:
        if (self.file is None) == (self.catalog is None):
            raise ValueError("give exactly one of 'file' or 'catalog'")
        if self.chat_template is not None and self.engine_kind != "llama-server":
            raise ValueError(f"chat_template needs the llama-server engine, not {self.engine_kind}")
        if self.sleep_after and self.engine_kind != "llama-server":
            raise ValueError(f"sleep_after needs engine llama-server, not {self.engine_kind}")
        if ("prompt_cache" in self.model_fields_set and self.prompt_cache
                and self.engine_kind != "llama-server"):
            raise ValueError(f"prompt_cache needs engine llama-server, not {self.engine_kind}")
        if self.gpu_layers != "auto" and self.engine_kind != "llama-server":
            raise ValueError(f"gpu_layers needs engine llama-server, not {self.engine_kind}")
        if self.kv_cache != "f16" and self.engine_kind != "llama-server":
            raise ValueError(f"kv_cache {self.kv_cache} needs engine llama-server (lalo passes "
                             f"no KV cache type to {self.engine_kind}): use f16 or that engine")
        flag = offload_flag(self.args)
        if self.gpu_layers != "auto" and flag is not None:
            raise ValueError(f"gpu_layers and args {flag!r} both set the GPU offload; keep one")
        return self

    @property
    def chat_template_is_file(self) -> bool:
        return self.chat_template is not None and _is_template_file(self.chat_template)

    @property
    def thread_count(self) -> int | None:
        """The threads setting as a number; None for auto (the engine's default)."""
        return None if self.threads == "auto" else self.threads

    @property
    def engine_kind(self) -> EngineKind:
        """The engine to run: as configured, else llamafile for `.llamafile` files."""
        if self.engine is not None:
            return self.engine
        if self.file is not None and self.file.endswith(".llamafile"):
            return "llamafile"
        return "llama-server"


class PeerConfig(_Section):
    """Another lalo, or any OpenAI-compatible server, whose models this one serves too."""

    url: str
    api_key_env: str | None = None  # the variable holding its key; never written to lalo.yaml
    # https peers: the PEM file of the CA (or the self-signed certificate) that signed the peer's
    # certificate, relative to this config; None: the system's trust store
    tls_ca_file: str | None = None
    models: Literal["auto"] | tuple[str, ...] = "auto"  # auto: what its /v1/models lists
    health_interval: Annotated[float, Field(gt=0, le=3600)] = 5.0
    health_timeout: Annotated[float, Field(gt=0, le=600)] = 3.0
    max_failures: Annotated[int, Field(ge=1, le=100)] = 2  # failed checks in a row: down

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_peer_url(value)

    @field_validator("api_key_env")
    @classmethod
    def _key_env(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(f"must be the name of an environment variable, got {value!r} "
                             "(the key itself goes in that variable, not here)")
        return value

    @model_validator(mode="after")
    def _tls(self) -> PeerConfig:
        if self.tls_ca_file is not None and not self.url.startswith("https://"):
            raise ValueError("tls_ca_file needs an https:// url")
        return self

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> str | tuple[str, ...]:
        if value == "auto":
            return "auto"
        if not isinstance(value, list | tuple) or not value:
            raise ValueError(f"must be 'auto' or a list of model names, got {value!r}")
        for name in value:
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"model name {name!r} must match {_NAME.pattern}")
        return tuple(value)


def check_peer_url(value: str) -> str:
    """`http[s]://HOST[:PORT]` (the address before `/v1`), without a trailing slash."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be http://HOST[:PORT] or https://HOST[:PORT], got {value!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"must be {parts.scheme}://HOST[:PORT] with no path (lalo adds "
                         f"/v1/...), got {value!r}")
    try:
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}") from None
    return f"{parts.scheme}://{parts.netloc}"


class Config(_Section):
    proxy: ProxyConfig = ProxyConfig()
    resources: ResourcesConfig = ResourcesConfig()
    engines: EnginesConfig = EnginesConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    models: Mapping[str, ModelConfig] = Field(default_factory=dict)
    peers: Mapping[str, PeerConfig] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _names(cls, models: Mapping[str, ModelConfig]) -> Mapping[str, ModelConfig]:
        for name in models:
            if not _NAME.match(name):
                raise ValueError(f"model name {name!r} must match {_NAME.pattern}")
        return models

    @field_validator("peers")
    @classmethod
    def _peer_names(cls, peers: Mapping[str, PeerConfig]) -> Mapping[str, PeerConfig]:
        for name in peers:
            if not _NAME.match(name):
                raise ValueError(f"peer name {name!r} must match {_NAME.pattern}")
        return peers


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config and where it came from (None: built in)."""

    config: Config
    source: Path | None

    @property
    def base_dir(self) -> Path:
        return self.source.parent if self.source is not None else Path.cwd()

    def chat_template(self, name: str) -> str | None:
        """A model's chat template: an absolute file path, a built-in template name, or None."""
        model = self.config.models[name]
        if model.chat_template is None or not model.chat_template_is_file:
            return model.chat_template
        path = resolve_path(model.chat_template, self.base_dir)
        if not path.is_file():
            raise ConfigError(f"models.{name}.chat_template: {path}: no such file")
        return str(path)

    def model_path(self, name: str) -> Path:
        """Absolute path of a file model (relative paths are relative to the config file)."""
        model = self.config.models[name]
        if model.file is None:
            raise ConfigError(f"models.{name}: is a catalog model; resolve it first")
        return resolve_path(model.file, self.base_dir)

    def describe_source(self) -> str:
        return str(self.source) if self.source is not None else "built-in default"


def resolve_path(text: str, base: Path) -> Path:
    path = Path(os.path.expandvars(text)).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def find_config_file(explicit: Path | None = None) -> Path | None:
    """The config file by lookup order, or None for the built-in default."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"{explicit}: config file not found")
        return explicit
    env = os.environ.get("LALO_CONFIG")
    if env:
        path = Path(env)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found (from $LALO_CONFIG)")
        return path
    for candidate in (Path.cwd() / CONFIG_NAME, paths.config_dir() / CONFIG_NAME):
        if candidate.is_file():
            return candidate
    return None


def load_config(
    explicit: Path | None = None,
    *,
    total_ram: int | None = None,
    default: Callable[[], Mapping[str, Any]] | None = None,
    check_files: bool = True,
) -> LoadedConfig:
    """Find, read and validate the config; `default()` makes the built-in one when no file is
    found (only then: the demo default writes a model file)."""
    source = find_config_file(explicit)
    if source is None:
        data = dict(default()) if default is not None else {}
        return LoadedConfig(
            config=validate(data, label="built-in default", total_ram=total_ram),
            source=None,
        )
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text") from exc
    loaded = LoadedConfig(config=parse_config(text, label=str(source), total_ram=total_ram),
                          source=source.resolve())
    if check_files:
        check_model_files(loaded)
    return loaded


def parse_config(text: str, *, label: str, total_ram: int | None = None) -> Config:
    """YAML text to a Config; errors carry `label:line: path: message`."""
    data, lines = read_yaml(text, label)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: the top level must be a mapping, got {type(data).__name__}")
    return validate(data, label=label, total_ram=total_ram, lines=lines)


def validate(
    data: dict[str, Any],
    *,
    label: str,
    total_ram: int | None = None,
    lines: Lines | None = None,
) -> Config:
    lines = lines or {}
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc, label, lines, Config)) from None
    _check_names(config, label, lines)
    _check_memory_args(config, label, lines)
    budget = config.resources.ram_budget
    total = total_ram if total_ram is not None else psutil.virtual_memory().total
    if budget != "auto" and budget > total:
        place = where(label, lines, ("resources", "ram_budget"))
        raise ConfigError(
            f"{place}resources.ram_budget: {format_size(budget)} is more than this "
            f"machine's RAM ({format_size(total)})"
        )
    return config


def _check_names(config: Config, label: str, lines: Lines) -> None:
    """Every model name and alias routes to exactly one model."""
    owner = {name: name for name in config.models}
    for name, model in config.models.items():
        for position, alias in enumerate(model.aliases):
            if alias == name:
                continue
            if alias in owner:
                path = ("models", name, "aliases", str(position))
                other = owner[alias]
                what = "the name of model" if other == alias else "already an alias of"
                raise ConfigError(
                    f"{where(label, lines, path)}models.{name}.aliases: {alias!r} is {what} "
                    f"{other!r}"
                )
            owner[alias] = name


def _check_memory_args(config: Config, label: str, lines: Lines) -> None:
    """`args` and `env` never set what a lalo setting sets, or memory the plan does not count:
    the plan must describe the server that is started (launcher.engines.server_flags)."""
    for name, model in config.models.items():
        refused = refused_arg(model.args, name, python=model.engine_kind == "llama-cpp-python")
        if refused is not None:
            position, why = refused
            place = where(label, lines, ("models", name, "args", str(position)))
            raise ConfigError(f"{place}models.{name}.args: {why}")
        if model.engine_kind == "llama-cpp-python":
            continue
        env = refused_env(model.env, name)
        if env is not None:
            variable, why = env
            raise ConfigError(f"{where(label, lines, ('models', name, 'env', variable))}"
                              f"models.{name}.env: {why}")


def check_model_files(loaded: LoadedConfig) -> None:
    for name, model in loaded.config.models.items():
        if model.file is None:
            continue
        path = loaded.model_path(name)
        if not path.is_file():
            raise ConfigError(f"{loaded.describe_source()}: models.{name}.file: {path} does not exist")
