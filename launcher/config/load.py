"""`lalo.yaml`: found in a fixed lookup order, parsed once into frozen, validated models.

Every problem is a ConfigError naming the YAML path (and line when known), e.g.
`lalo.yaml:7: models.qwen.ctx_size: must be >= 128, got 0`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    ValidationError,
    field_validator,
)

from launcher import paths
from launcher.config.fields import (
    CONFIG_NAME,
    NAME,
    Section,
)
from launcher.config.model import ModelConfig
from launcher.config.sections import (
    EnginesConfig,
    PeerConfig,
    ProxyConfig,
    ResourcesConfig,
    SupervisorConfig,
)
from launcher.config.server_args import refused_arg, refused_env
from launcher.errors import ConfigError
from launcher.machine.memory import system_memory
from launcher.units import format_size
from launcher.yamlfile import Lines, describe, read_yaml, where


class Config(Section):
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
            if not NAME.match(name):
                raise ValueError(f"model name {name!r} must match {NAME.pattern}")
        return models

    @field_validator("peers")
    @classmethod
    def _peer_names(cls, peers: Mapping[str, PeerConfig]) -> Mapping[str, PeerConfig]:
        for name in peers:
            if not NAME.match(name):
                raise ValueError(f"peer name {name!r} must match {NAME.pattern}")
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
    memory = system_memory() if total_ram is None else None
    total = memory.total if memory is not None else total_ram or 0
    if budget != "auto" and budget > total:
        place = where(label, lines, ("resources", "ram_budget"))
        what = "the memory limit of this container" if memory and memory.limit else "this machine's RAM"
        raise ConfigError(
            f"{place}resources.ram_budget: {format_size(budget)} is more than {what} "
            f"({format_size(total)})"
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
