"""What lalo decides at build time for the Windows package, as the two files it ships:

- `presets.ini`: llama.cpp router-mode presets, one section per model (file, aliases, context,
  slots, threads, KV cache type, the model's own `args`), the format `llama-server
  --models-preset` reads;
- `lalo-launch.ini`: what the launcher (launcher.c) needs: the name, the port, each model's
  memory estimate and the RAM table (`fits=K BYTES`: the RAM any K of the models need at once,
  lalo's reserve included), from which it takes `--models-max` for the machine it runs on.

Pure functions over the spec and lalo's estimates; the target writes the files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from launcher import __version__
from launcher.config import ModelConfig
from launcher.config.server_args import refused_arg
from launcher.engines.llama_server import kv_cache_args
from launcher.errors import PackagingError
from launcher.models.shape import ModelFacts
from launcher.packaging.spec import BundleSpec
from launcher.placement.estimate import MemorySettings, estimate_for, repack_types_for

PRESETS = "presets.ini"
LAUNCH = "lalo-launch.ini"
SERVER = "bin/llama-server.exe"
MODELS = "models"
TEMPLATES = "templates"
# The Windows engine is built for AVX2 CPUs (FACTS.md): the tensor types it repacks.
WINDOWS_REPACK = repack_types_for("x86_64", {"avx2"})
# The router process itself (no model: an HTTP server and its model table), measured under wine.
ROUTER_MEMORY = 24 * 1024**2
# Options the router sets for each model itself, or that lalo's own settings must carry.
_ROUTER_OWNED = {"host", "port", "api-key", "api-key-file", "models-dir", "models-max",
                 "models-preset", "models-autoload", "alias", "a", "m", "model", "hf-repo", "hf"}


@dataclass(frozen=True)
class PackedModel:
    """One model as the package serves it."""

    name: str
    config: ModelConfig
    file: str  # relative to the package root, '/' separators
    memory: int  # lalo's estimate, bytes
    template: str | None = None  # a chat template file shipped with it (relative), if any


def model_memory(facts: ModelFacts, config: ModelConfig) -> int:
    """lalo's estimate of the model's child server (its kv_cache and args included) + the router."""
    return estimate_for(facts, MemorySettings.of(config), WINDOWS_REPACK).total + ROUTER_MEMORY


def fits_table(memories: Sequence[int], reserve: int, max_loaded: int = 0) -> list[int]:
    """RAM needed for K models at once, K = 1..n (capped by `max_loaded`): lalo's reserve plus
    the K largest estimates, since the router may load any K of them."""
    ordered = sorted(memories, reverse=True)
    count = min(len(ordered), max_loaded) if max_loaded else len(ordered)
    return [reserve + sum(ordered[:k]) for k in range(1, count + 1)]


def preset_args(name: str, args: Sequence[str]) -> list[tuple[str, str]]:
    """A model's `args` as preset keys: `--flag` alone is `flag = true`, `--key value` is
    `key = value`. Options the router owns, or that lalo's own settings set, are refused."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            raise PackagingError(f"models.{name}.args: {arg!r} is not an option (the router "
                                 "preset takes `--key value` or `--flag`)")
        key = arg.lstrip("-")
        value = "true"
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(args) and not _is_option(args[i + 1]):
            value = args[i + 1]
            i += 1
        if key in _ROUTER_OWNED:
            raise PackagingError(f"models.{name}.args: {arg} is set by the router or by lalo "
                                 "(use the model's own settings: file, aliases)")
        # the config refused these at load already; a spec built by hand meets the same rule
        refused = refused_arg((arg, value), name)
        if refused is not None:
            raise PackagingError(f"models.{name}.args: {refused[1]}")
        pairs.append((key, value))
        i += 1
    return pairs


def _pairs(flags: Sequence[str]) -> list[tuple[str, str]]:
    """`--cache-type-k q8_0 ...` as preset keys: cache-type-k = q8_0 (the flags' long names)."""
    return [(flags[i].lstrip("-"), flags[i + 1]) for i in range(0, len(flags), 2)]


def _is_option(text: str) -> bool:
    if not text.startswith("-") or text == "-":
        return False
    try:
        float(text)  # a negative number is a value
    except ValueError:
        return True
    return False


def presets_ini(spec: BundleSpec, models: Sequence[PackedModel]) -> str:
    lines = [f"; llama.cpp router presets for {spec.name}, written by lalo {__version__} from "
             f"{spec.source.name}.", "; Paths are relative to this folder (the server's working "
             "folder).", "version = 1", ""]
    for model in models:
        config = model.config
        if config.request_rules:
            raise PackagingError(
                f"models.{model.name}: defaults, set, limits and strip are applied by lalo's "
                "proxy, and the Windows package serves through llama.cpp's router without it: "
                "remove them for this target (or set the server's defaults in args, e.g. "
                "--temp 0)")
        lines.append(f"[{model.name}]")
        lines.append(f"model = {model.file}")
        if config.aliases:
            lines.append(f"alias = {','.join(config.aliases)}")
        lines.append(f"ctx-size = {config.ctx_size}")
        lines.append(f"parallel = {config.parallel}")
        if config.thread_count is not None:
            lines.append(f"threads = {config.thread_count}")
        if config.embeddings:
            lines.append("embeddings = true")
        lines += [f"{key} = {value}" for key, value in _pairs(kv_cache_args(config.kv_cache))]
        if model.template is not None:
            lines.append(f"chat-template-file = {model.template}")
        elif config.chat_template is not None:
            lines.append(f"chat-template = {config.chat_template}")
        lines += [f"{key} = {value}" for key, value in preset_args(model.name, config.args)]
        lines.append("")
    return "\n".join(lines)


def launch_ini(spec: BundleSpec, models: Sequence[PackedModel]) -> str:
    resources = spec.config.resources
    table = fits_table([m.memory for m in models], resources.ram_reserve, resources.max_loaded)
    lines = [
        f"# What {spec.name}.exe needs to start, written by lalo {__version__} from "
        f"{spec.source.name}.",
        f"name={spec.name}",
        f"title={spec.name} (lalo {__version__})",
        f"port={spec.config.proxy.port}",
        f"server={SERVER}",
        f"presets={PRESETS}",
        f"reserve={resources.ram_reserve}",
        "# model=NAME ESTIMATE_BYTES ALIASES",
    ]
    lines += [f"model={m.name} {m.memory} {','.join(m.config.aliases) or '-'}" for m in models]
    lines.append("# fits=K BYTES: the RAM that any K models need at once, the reserve included")
    lines += [f"fits={k} {need}" for k, need in enumerate(table, start=1)]
    return "\n".join(lines) + "\n"


def estimates(facts: Mapping[str, ModelFacts], configs: Mapping[str, ModelConfig]) -> dict[str, int]:
    return {name: model_memory(facts[name], configs[name]) for name in configs}
