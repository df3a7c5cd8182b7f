"""`lalo reload`, SIGHUP, `POST /api/reload`: re-read lalo.yaml, restart only what changed."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

from launcher.config import LoadedConfig
from launcher.errors import EngineError, LaloError, StartupError
from launcher.placement.context import fit_contexts
from launcher.placement.gpu_offload import Offload
from launcher.placement.measurements import Measurements, with_measurements
from launcher.placement.resolve import ResolvedModel, resolve_models
from launcher.serve.announce import Announce
from launcher.serve.factory import ServerFactory
from launcher.serve.prepare import usable_models
from launcher.supervisor.supervisor import Supervisor


class Reloader:
    """`lalo reload`, SIGHUP, `POST /api/reload`: re-read lalo.yaml and apply what changed.

    A config that does not load changes nothing (the reason is the one line `lalo up` would
    print). Otherwise only models whose settings changed are drained and restarted, new ones
    are added (started if `preload`), removed ones are drained and stopped; the servers of
    unchanged models keep running (same pid).
    """

    def __init__(self, loaded: LoadedConfig, models: Sequence[ResolvedModel],
                 supervisor: Supervisor, factory: ServerFactory, measurements: Measurements,
                 announce: Announce, ctx_budget: int = 0) -> None:
        self.loaded = loaded
        self.models = {model.name: model for model in models}
        self.ctx_budget = ctx_budget  # the budget `ctx_size: auto` models were fitted in at start
        self.supervisor = supervisor
        self.factory = factory
        self.measurements = measurements
        self.announce = announce
        self._lock = asyncio.Lock()

    async def reload(self) -> dict[str, Any]:
        async with self._lock:
            try:
                loaded, models, offload = self._read()
            except LaloError as exc:
                self.announce(f"reload: {exc}; nothing changed")
                return {"status": "error", "error": str(exc)}
            new = {model.name: model for model in models}
            removed = [name for name in self.models if name not in new]
            added = [name for name in new if name not in self.models]
            old_offload = self.factory.offload
            changed = [name for name in new if name in self.models
                       and (_settings(self.models[name]) != _settings(new[name])
                            or old_offload.assignment(name) != offload.assignment(name))]
            unchanged = [name for name in new if name not in added and name not in changed]
            factory = dataclasses.replace(self.factory, loaded=loaded, offload=offload)
            resources = loaded.config.resources
            await self.supervisor.reconfigure(
                replace=[factory.make(new[name]) for name in (*changed, *added)],
                remove=removed,
                max_loaded=resources.max_loaded, max_wait=resources.max_wait,
                ram_budget=resources.ram_budget, ram_reserve=resources.ram_reserve,
                yield_memory=resources.yield_memory,
            )
            previous_peers = self.loaded.config.peers
            self.loaded, self.models, self.factory = loaded, new, factory
            summary: dict[str, Any] = {
                "status": "ok", "unchanged": unchanged, "restarted": changed,
                "added": added, "removed": removed}
            parts = [f"{key} {', '.join(names)}" for key, names in summary.items()
                     if key != "status" and key != "unchanged" and names]
            if loaded.config.peers != previous_peers:  # read once, at `lalo up`
                summary["peers"] = "changed in the file but not applied: restart lalo for peers"
                parts.append(f"peers {summary['peers']}")
            self.announce("reload: " + ("; ".join(parts) if parts else "no model changed"))
            return summary

    def _read(self) -> tuple[LoadedConfig, list[ResolvedModel], Offload]:
        from launcher.config import load_config
        from launcher.placement.resolve import catalog_for

        if self.loaded.source is None:
            raise StartupError("lalo runs the built-in default config: there is no file to reload")
        loaded = load_config(self.loaded.source)
        missing = {m.engine_kind for m in loaded.config.models.values()} - set(self.factory.engines)
        if missing:
            raise EngineError(f"reload cannot add an engine lalo did not start with "
                              f"({', '.join(sorted(missing))}); restart lalo")
        models = fit_contexts(resolve_models(loaded, catalog=catalog_for(loaded)), self.ctx_budget,
                              keep=self._kept_contexts(loaded))
        models = usable_models(with_measurements(models, self.measurements))
        offload = self.factory.offload.replan(models)
        return loaded, offload.apply(models, self.measurements), offload


    def _kept_contexts(self, loaded: LoadedConfig) -> dict[str, int]:
        """`ctx_size: auto` models whose settings did not change keep their context: the RAM
        their servers hold is not free now, so fitting again would shrink them."""
        kept = {}
        for name, old in self.models.items():
            new = loaded.config.models.get(name)
            if (old.config.ctx_auto and new is not None
                    and new.model_copy(update={"ctx_size": old.config.ctx_size}) == old.config):
                kept[name] = old.config.ctx_size
        return kept


def _settings(model: ResolvedModel) -> tuple[object, ...]:
    """What a model's server is started from: equal means its server can stay."""
    return (model.config, model.path, model.error)
