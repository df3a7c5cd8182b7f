"""The lalo.yaml sections other than `models`: proxy, API keys, activity, resources, engines,
supervisor, peers."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from launcher.config.fields import (
    ENV_NAME,
    HOST_NAME,
    NAME,
    ORIGIN,
    ApiKeyRole,
    Section,
)
from launcher.units import auto_or_size_field, size_field


class ApiKey(Section):
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
        if not NAME.match(name):
            raise ValueError(f"key name {name!r} must match {NAME.pattern}")
        return name


class ActivityConfig(Section):
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


class ProxyConfig(Section):
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
            if not HOST_NAME.match(name):
                raise ValueError(f"{host!r} is not a host name (no scheme, port or path; "
                                 "'*.' may start a name)")
        return tuple(host.lower() for host in hosts)

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        for origin in origins:
            if origin in ("*", "null"):
                continue
            if not ORIGIN.match(origin):
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


class ResourcesConfig(Section):
    ram_budget: int | Literal["auto"] = "auto"
    ram_reserve: int = 1024**3
    max_loaded: Annotated[int, Field(ge=0)] = 0
    # seconds a request may wait behind other models' batches before those drain for it
    max_wait: Annotated[float, Field(ge=0, le=86_400)] = 10.0
    prompt_cache_size: int = 2 * 1024**3  # disk for saved prompt caches, all models together
    # while the machine's available RAM stays under ram_reserve, unload idle unpinned models
    # (off for a dedicated server, where nothing else takes RAM)
    yield_memory: bool = True

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


class LlamaServerEngineConfig(Section):
    path: str = "auto"
    variant: Literal["native", "portable", "cuda"] = "native"


class LlamafileEngineConfig(Section):
    runtime: str | None = None


class LlamaCppPythonEngineConfig(Section):
    python: str = "auto"


class EnginesConfig(Section):
    llama_server: LlamaServerEngineConfig = LlamaServerEngineConfig()
    llamafile: LlamafileEngineConfig = LlamafileEngineConfig()
    llama_cpp_python: LlamaCppPythonEngineConfig = LlamaCppPythonEngineConfig()


class SupervisorConfig(Section):
    load_timeout: Annotated[float, Field(gt=0)] = 120.0
    health_interval: Annotated[float, Field(gt=0)] = 2.0
    liveness_timeout: Annotated[float, Field(gt=0)] = 10.0
    stop_timeout: Annotated[float, Field(gt=0)] = 10.0
    max_failures: Annotated[int, Field(ge=1)] = 5
    stable_after: Annotated[float, Field(gt=0)] = 60.0
    backoff_initial: Annotated[float, Field(gt=0)] = 1.0
    backoff_max: Annotated[float, Field(gt=0)] = 30.0




class PeerConfig(Section):
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
        if value is not None and not ENV_NAME.match(value):
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
            if not isinstance(name, str) or not NAME.match(name):
                raise ValueError(f"model name {name!r} must match {NAME.pattern}")
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


