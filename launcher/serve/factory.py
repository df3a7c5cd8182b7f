"""The one place model servers and their supervisor are made: a resolved model -> its
ManagedModel (settings, log, timeouts, sleep and prompt cache), restart policy and facts."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher import paths
from launcher.config import LoadedConfig
from launcher.engines.base import Engine, ServerSettings
from launcher.placement.cpu_share import CpuShare, quota_threads, wait_env
from launcher.placement.estimate import MemorySettings
from launcher.placement.gpu_offload import NO_GPU, Offload
from launcher.placement.measurements import Measurements, measurement_key
from launcher.placement.resolve import ResolvedModel
from launcher.supervisor.events import SupervisorEvents
from launcher.supervisor.instance import ChildRecords
from launcher.supervisor.logs import ModelLog
from launcher.supervisor.policy import RestartPolicy
from launcher.supervisor.process import ManagedModel, Timeouts
from launcher.supervisor.server_options import sleep_and_prompt_cache, uses_sliding_window
from launcher.supervisor.sleep import props_sleeping
from launcher.supervisor.supervisor import SupervisedModel, Supervisor


def log_dir() -> Path:
    return paths.state_dir() / "logs"


@dataclass(frozen=True)
class ServerFactory:
    """Makes the ManagedModel (and its facts and restart policy) of one resolved model."""

    loaded: LoadedConfig
    engines: dict[str, Engine]
    events: SupervisorEvents  # the supervisor's: each model gets its share
    share: CpuShare
    host: str = "127.0.0.1"
    # each model's -ngl / --tensor-split (launcher.placement.gpu_offload); none by default
    offload: Offload = dataclasses.field(default_factory=Offload)

    def make(self, model: ResolvedModel) -> tuple[SupervisedModel, ManagedModel, RestartPolicy]:
        sup = self.loaded.config.supervisor
        cfg = model.config
        # a model without a file (a catalog model that could not be pulled) is failed with its
        # reason; the others are served
        path = model.path if model.path is not None else Path(cfg.file or cfg.catalog or model.name)
        settings = ServerSettings(
            model_path=path,
            host=self.host,
            port=0,
            api_key="",
            ctx_size=cfg.ctx_size,
            parallel=cfg.parallel,
            threads=cfg.thread_count or quota_threads(),
            embeddings=cfg.embeddings,
            chat_template=self.loaded.chat_template(model.name),
            extra_args=(*_alias_args(cfg.engine_kind, model.name), *cfg.args),
            kv_cache=cfg.kv_cache,
            env={**wait_env(self.share, cfg.env), **cfg.env},
        )
        settings = self.offload.server_settings(model.name, settings)
        # sleeping when idle and the prompt cache kept across stops (llama-server only);
        # this also drops slot files of an older model file, engine or setting
        model_log = ModelLog(log_dir() / f"{model.name}.log")
        settings, slot_store = sleep_and_prompt_cache(
            model.name, cfg, settings, self.engines[cfg.engine_kind],
            self.loaded.config.resources.prompt_cache_size,
            sliding_window=uses_sliding_window(model.info), note=model_log.note)
        key = self.offload.measurement_key(
            model.name, measurement_key(path, cfg.engine_kind, cfg.ctx_size, cfg.parallel,
                                        MemorySettings.of(cfg).key()))
        managed = ManagedModel(
            model.name,
            self.engines[cfg.engine_kind],
            settings,
            model_log,
            timeouts=Timeouts(
                load_timeout=cfg.load_timeout or sup.load_timeout,
                health_interval=sup.health_interval,
                liveness_timeout=sup.liveness_timeout,
                stop_timeout=sup.stop_timeout,
            ),
            events=self.events.for_model(model.name, key),
            sleep_probe=props_sleeping if settings.sleep_after else None,
            prompt_cache=slot_store,
        )
        policy = RestartPolicy(
            initial_delay=sup.backoff_initial, max_delay=sup.backoff_max,
            max_failures=sup.max_failures, stable_after=sup.stable_after,
        )
        meta = SupervisedModel(
            name=model.name,
            aliases=tuple(cfg.aliases),
            engine=cfg.engine_kind,
            estimate=model.estimate.total if model.estimate is not None else 0,
            preload=cfg.preload,
            ttl=cfg.ttl,
            path=str(path),
            synthetic=bool(model.info and model.info.is_synthetic),
            measurement_key=key,
            pinned=cfg.pinned,
            ctx_size=cfg.ctx_size, parallel=cfg.parallel, kv_cache=cfg.kv_cache,
            request_rules=cfg.request_rules or None,
        )
        if model.error is not None:
            managed.mark_invalid(model.error)
        return meta, managed, policy


def build_supervisor(
    loaded: LoadedConfig,
    models: Sequence[ResolvedModel],
    engines: dict[str, Engine],
    records: ChildRecords,
    measurements: Measurements,
    share: CpuShare,
    host: str = "127.0.0.1",
    offload: Offload = NO_GPU,
) -> Supervisor:
    """The supervisor of `models`; `share` decides the OpenMP wait policy of their servers."""
    config = loaded.config
    events = SupervisorEvents(records, measurements)
    factory = ServerFactory(loaded, engines, events, share, host, offload)
    made = [factory.make(model) for model in models]
    keys = {meta.name: meta.measurement_key for meta, _, _ in made}
    known = {name: value for name in keys if (value := measurements.get(keys[name])) is not None}
    supervisor = Supervisor(
        [(meta, managed) for meta, managed, _ in made],
        ram_budget=config.resources.ram_budget,
        ram_reserve=config.resources.ram_reserve,
        unload_when_ram_short=config.resources.unload_when_ram_short,
        max_loaded=config.resources.max_loaded,
        queue_size=config.proxy.queue_size,
        max_wait=config.resources.max_wait,
        wait_timeout=config.proxy.upstream_timeout,
        drain_timeout=config.proxy.upstream_timeout,
        policies={meta.name: policy for meta, _, policy in made},
        measured=known,
        events=events,
    )
    return supervisor


def _alias_args(engine: str, name: str) -> tuple[str, ...]:
    # llama-server reports this name in its answers instead of the file path
    return ("--alias", name) if engine == "llama-server" else ()
