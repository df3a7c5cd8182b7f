"""llama.cpp's `llama-server`: the default engine."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from launcher.engines.base import LaunchSpec, ServerSettings, base_url


@dataclass(frozen=True)
class LlamaServerEngine:
    binary: Path
    kind: str = "llama-server"
    # built by lalo with patch 0002: its threads can be changed while it runs (`POST /threads`)
    set_threads: bool = False
    # built by lalo with patch 0003: `--sleep-save-slots` keeps the prompt cache across a sleep
    sleep_saves_slots: bool = False
    # built by lalo with patch 0004: a non-streamed request notices within a second that its
    # client left, even while other requests generate (else lalo asks for a stream instead)
    notices_gone_clients: bool = False

    @classmethod
    def with_patches(cls, binary: Path, patches: Collection[str]) -> LlamaServerEngine:
        """The engine at `binary`, built with lalo's patches named `patches`."""
        from launcher.engines.patch_series import (
            NOTICES_GONE_CLIENTS,
            SLEEP_SAVE_SLOTS,
            THREADS_ROUTE,
        )

        return cls(binary, set_threads=THREADS_ROUTE in patches,
                   sleep_saves_slots=SLEEP_SAVE_SLOTS in patches,
                   notices_gone_clients=NOTICES_GONE_CLIENTS in patches)

    def launch_spec(self, settings: ServerSettings) -> LaunchSpec:
        argv = [str(self.binary), *server_args(settings), *chat_template_args(settings.chat_template),
                *sleep_and_slot_args(settings, saves_slots=self.sleep_saves_slots)]
        return LaunchSpec(
            argv=tuple(argv),
            # The key goes through the environment, not argv: /proc/PID/environ is private to
            # the user, /proc/PID/cmdline is readable by everyone on the machine.
            env={"LLAMA_API_KEY": settings.api_key, **settings.env},
            base_url=base_url(settings.host, settings.port),
            ready_path="/health",
            health_path="/health",
            health_needs_key=False,
        )


def server_args(settings: ServerSettings, *, metrics: bool = True) -> list[str]:
    """llama.cpp server flags shared by llama-server and llamafile's server mode."""
    args = [
        "--model", str(settings.model_path),
        "--host", settings.host,
        "--port", str(settings.port),
        "--ctx-size", str(settings.ctx_size),
        "--parallel", str(settings.parallel),
    ]
    if metrics:
        args.append("--metrics")
    if settings.threads is not None:
        args += ["--threads", str(settings.threads)]
    if settings.embeddings:
        args.append("--embeddings")
    args += kv_cache_args(settings.kv_cache)
    args += gpu_args(settings)
    args += list(settings.extra_args)
    return args


def kv_cache_args(kv_cache: str) -> list[str]:
    """K and V of one type; flash attention on for a quantized one: this llama-server refuses a
    quantized V cache without it ("quantized V cache requires flash_attn to be enabled"), and its
    default `auto` may turn it off on a backend that lacks it, where `on` fails loudly instead.
    Nothing for f16, llama-server's default (older command lines stay as they were)."""
    if kv_cache == "f16":
        return []
    return ["--cache-type-k", kv_cache, "--cache-type-v", kv_cache, "--flash-attn", "on"]


def gpu_args(settings: ServerSettings) -> list[str]:
    """-ngl and --tensor-split as lalo's GPU plan chose them (nothing when it chose nothing)."""
    if settings.gpu_layers is None:
        return []
    args = ["--n-gpu-layers", str(settings.gpu_layers)]
    if settings.tensor_split:
        args += ["--tensor-split", ",".join(f"{share:g}" for share in settings.tensor_split)]
    return args


def chat_template_args(template: str | None) -> list[str]:
    """llama-server flags for a model's `chat_template`: a file path, or a built-in name.

    A file is rendered by llama-server's Jinja engine (`--jinja` first), which also parses the
    tool calls the template describes into `tool_calls`. A name selects one of llama.cpp's own
    C++ templates, which exist only without Jinja: with `--jinja` on (this llama-server's
    default) `--chat-template gemma` would be the one-word Jinja template "gemma".
    """
    if template is None:
        return []
    if Path(template).is_absolute():
        return ["--jinja", "--chat-template-file", template]
    return ["--no-jinja", "--chat-template", template]


def sleep_and_slot_args(settings: ServerSettings, *, saves_slots: bool = False) -> list[str]:
    """llama-server's own flags for sleeping when idle and for slot save/restore; with
    `saves_slots` (lalo's patch 0003) a model with both saves its slots before it sleeps and
    restores them when it wakes, so a sleep keeps its cached prompts."""
    args: list[str] = []
    if settings.sleep_after > 0:
        args += ["--sleep-idle-seconds", str(settings.sleep_after)]
    if settings.slot_save_path is not None:
        args += ["--slot-save-path", str(settings.slot_save_path)]
        if saves_slots and settings.sleep_after > 0:
            args.append("--sleep-save-slots")
    return args
