"""What lalo does differently for a llama-server built with its patch series: per patch, the
engine's flag, and what the server factory makes of it for each model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from launcher.config import LoadedConfig, parse_config
from launcher.engines.llama_server import LlamaServerEngine
from launcher.engines.patch_series import (
    NOTICES_GONE_CLIENTS,
    SLEEP_SAVE_SLOTS,
    THREADS_ROUTE,
    series,
)
from launcher.placement.cpu_share import CpuShare
from launcher.placement.resolve import resolve_models
from launcher.serve.factory import ServerFactory
from launcher.supervisor.events import SupervisorEvents
from launcher.supervisor.instance import ChildRecords


def test_every_patch_lalo_acts_on_is_in_the_series() -> None:
    names = {patch.name for patch in series()}
    assert {THREADS_ROUTE, SLEEP_SAVE_SLOTS, NOTICES_GONE_CLIENTS} <= names


def test_flags_follow_the_patches_the_engine_was_built_with() -> None:
    every = LlamaServerEngine.with_patches(Path("/e"), [p.name for p in series()])
    assert every.set_threads and every.sleep_saves_slots and every.notices_gone_clients
    some = LlamaServerEngine.with_patches(Path("/e"), [THREADS_ROUTE])
    assert some.set_threads and not some.sleep_saves_slots and not some.notices_gone_clients
    assert LlamaServerEngine.with_patches(Path("/e"), []) == LlamaServerEngine(Path("/e"))


def _meta(tmp_path: Path, small_model: Path, engine: LlamaServerEngine,
          extra: str = "") -> dict[str, Any]:
    text = f"models:\n  a: {{file: {small_model}{extra}}}\n"
    loaded = LoadedConfig(parse_config(text, label="x", total_ram=64 * 1024**3), tmp_path / "x.yaml")
    factory = ServerFactory(loaded, {"llama-server": engine},
                            SupervisorEvents(ChildRecords(tmp_path)), CpuShare(1, 1, 2))
    meta, _, _ = factory.make(resolve_models(loaded)[0])
    return {"assembles": meta.assembles, "governed": meta.governed}


def test_non_streamed_requests_are_streamed_only_for_a_server_that_needs_it(
    tmp_path: Path, small_model: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without patch 0004 llama-server notices a gone non-streamed client only on a stream, so
    lalo asks for one and puts the answer back together; with it, the request goes as it came
    (a stream costs the server 5-6 % of its decode speed on 2 CPUs)."""
    monkeypatch.setenv("LALO_CACHE_DIR", str(tmp_path / "cache"))
    plain = _meta(tmp_path, small_model, LlamaServerEngine(Path("/bin/llama-server")))
    assert plain == {"assembles": True, "governed": False}
    lalos = _meta(tmp_path, small_model, LlamaServerEngine.with_patches(
        Path("/bin/llama-server"), [p.name for p in series()]))
    assert lalos == {"assembles": False, "governed": True}
    fixed = _meta(tmp_path, small_model, LlamaServerEngine.with_patches(
        Path("/bin/llama-server"), [THREADS_ROUTE]), extra=", threads: 2")
    assert fixed == {"assembles": True, "governed": False}
