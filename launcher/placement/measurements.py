"""Memory measured on real loads, remembered per (file, settings) so the planner can use it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from launcher import paths
from launcher.paths import write_private_json
from launcher.placement.estimate import MemorySettings
from launcher.placement.resolve import ResolvedModel

FILE = "measured-memory.json"


def measurement_key(model_path: Path, engine: str, ctx_size: int, parallel: int,
                    memory: str = "") -> str:
    """`memory`: the other settings that change RSS (`MemorySettings.key()`: a quantized KV
    cache, -ub, --swa-full...), empty for the defaults, so that older keys still match."""
    try:
        stat = model_path.stat()
        identity = f"{stat.st_size}:{int(stat.st_mtime)}"
    except OSError:
        identity = "missing"
    key = f"{model_path}|{identity}|{engine}|ctx={ctx_size}|np={parallel}"
    return f"{key}|{memory}" if memory else key


class Measurements:
    """Peak RSS per key; written by the supervisor, read by `lalo plan` and `lalo up`."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.path = (state_dir or paths.state_dir()) / FILE
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
            self._data: dict[str, int] = {str(k): int(v) for k, v in loaded.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            self._data = {}

    def get(self, key: str) -> int | None:
        return self._data.get(key)

    def record(self, key: str, rss: int) -> None:
        if self._data.get(key, 0) >= rss:
            return
        self._data[key] = rss
        try:
            write_private_json(self.path, self._data)
        except OSError:
            pass  # a read-only or full state dir must not take a model down


def with_measurements(models: list[ResolvedModel], measurements: Measurements) -> list[ResolvedModel]:
    """Each model with the RSS measured on an earlier load of the same file and settings."""
    result = []
    for model in models:
        value = None
        if model.path is not None:
            cfg = model.config
            key = measurement_key(model.path, cfg.engine_kind, cfg.ctx_size, cfg.parallel,
                                  MemorySettings.of(cfg).key())
            value = measurements.get(key)
        result.append(replace(model, measured=value) if value is not None else model)
    return result
