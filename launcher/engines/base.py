"""What every engine kind tells the supervisor: the argv to start one model server and how to probe it.

An engine never starts anything itself; the supervisor owns processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class ServerSettings:
    """Per-start settings of one model server, decided by the supervisor."""

    model_path: Path
    host: str
    port: int
    api_key: str
    ctx_size: int
    parallel: int
    threads: int | None  # None: the engine's own default
    embeddings: bool = False
    chat_template: str | None = None  # a template file's absolute path, or a built-in name
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    sleep_after: int = 0  # llama-server: seconds idle before it frees its weights; 0 = never
    slot_save_path: Path | None = None  # llama-server: where slot save/restore files go
    # llama-server on a GPU build: layers to offload (-ngl) and the share per GPU, as
    # launcher.placement.gpu_plan chose them; None leaves it to llama-server (--fit, see docs/gpu.md)
    gpu_layers: int | None = None
    tensor_split: tuple[float, ...] = ()
    kv_cache: str = "f16"  # llama-server: the K and V cache type (config refuses others elsewhere)


@dataclass(frozen=True)
class LaunchSpec:
    """How to run and probe one server process."""

    argv: tuple[str, ...]
    env: Mapping[str, str]  # added to lalo's own environment
    base_url: str  # e.g. http://127.0.0.1:41234
    ready_path: str  # GET answers 200 once the model is loaded
    health_path: str  # GET answers 200 while the server is alive and serving
    health_needs_key: bool  # whether probes must send the API key


class Engine(Protocol):
    """One engine kind (llama-server, llamafile, llama-cpp-python)."""

    @property
    def kind(self) -> str: ...

    def launch_spec(self, settings: ServerSettings) -> LaunchSpec:
        """The command line and probes for `settings`; raises EngineError if it cannot run."""
        ...


def base_url(host: str, port: int) -> str:
    return f"http://{host}:{port}"
