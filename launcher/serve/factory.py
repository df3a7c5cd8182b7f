"""The one place model servers and their supervisor are made: a resolved model -> its
ManagedModel (settings, log, timeouts, sleep and prompt cache), restart policy and facts."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher import paths
from launcher.config import LoadedConfig, ModelConfig
from launcher.engines.base import Engine, ServerSettings
from launcher.engines.llama_server import LlamaServerEngine
from launcher.models.capabilities import capabilities_of
from launcher.placement.cpu_share import CpuShare, quota_threads, usable_cpus, wait_env
from launcher.placement.estimate import MemorySettings
from launcher.placement.gpu_offload import NO_GPU, Offload
from launcher.placement.measurements import Measurements, measurement_key
from launcher.placement.resolve import ResolvedModel
from launcher.supervisor.events import SupervisorEvents
from launcher.supervisor.governor import OtherLoad, ThreadGovernor, post_threads
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

    @staticmethod
    def governs(engine: Engine, cfg: ModelConfig) -> bool:
        """Threads from what is busy: a llama-server that can change them, `threads: auto`."""
        return isinstance(engine, LlamaServerEngine) and engine.set_threads and cfg.thread_count is None

    def make(self, model: ResolvedModel) -> tuple[SupervisedModel, ManagedModel, RestartPolicy]:
        sup = self.loaded.config.supervisor
        cfg = model.config
        # a model without a file (a catalog model that could not be pulled) is failed with its
        # reason; the others are served
        path = model.path if model.path is not None else Path(cfg.file or cfg.catalog or model.name)
        engine = self.engines[cfg.engine_kind]
        governed = self.governs(engine, cfg)
        settings = ServerSettings(
            model_path=path,
            host=self.host,
            port=0,
            api_key="",
            ctx_size=cfg.ctx_size,
            parallel=cfg.parallel,
            # governed: it starts with every CPU lalo may use, the governor lowers that while
            # others are busy; the threads never exceed the CPUs, so OpenMP keeps its spin
            threads=usable_cpus() if governed else cfg.thread_count or quota_threads(),
            embeddings=cfg.embeddings,
            chat_template=self.loaded.chat_template(model.name),
            extra_args=(*_alias_args(cfg.engine_kind, model.name), *cfg.args),
            kv_cache=cfg.kv_cache,
            env=dict(cfg.env) if governed else {**wait_env(self.share, cfg.env), **cfg.env},
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
            governed=governed,
            assembles=isinstance(engine, LlamaServerEngine) and not engine.notices_gone_clients,
            capabilities=capabilities_of(model.info, embeddings=cfg.embeddings, args=tuple(cfg.args),
                                         chat_template=_template_text(settings.chat_template)),
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
    # one governor for the models whose threads follow what is busy (and any a reload adds)
    governor = None
    if any(isinstance(engine, LlamaServerEngine) and engine.set_threads for engine in engines.values()):
        cpus = usable_cpus()
        governor = ThreadGovernor(cpus, post_threads, others=OtherLoad(cpus))
    keys = {meta.name: meta.measurement_key for meta, _, _ in made}
    known = {name: value for name in keys if (value := measurements.get(keys[name])) is not None}
    supervisor = Supervisor(
        [(meta, managed) for meta, managed, _ in made],
        ram_budget=config.resources.ram_budget,
        ram_reserve=config.resources.ram_reserve,
        yield_memory=config.resources.yield_memory,
        max_loaded=config.resources.max_loaded,
        queue_size=config.proxy.queue_size,
        max_wait=config.resources.max_wait,
        wait_timeout=config.proxy.upstream_timeout,
        drain_timeout=config.proxy.upstream_timeout,
        policies={meta.name: policy for meta, _, policy in made},
        measured=known,
        events=events,
        governor=governor,
    )
    return supervisor


def _template_text(template: str | None) -> str | None:
    """The text of the chat template lalo.yaml sets (None: the GGUF's own). A built-in name
    runs without Jinja, so without tools: no text to find them in."""
    if template is None:
        return None
    if not Path(template).is_absolute():
        return ""
    try:
        return Path(template).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _alias_args(engine: str, name: str) -> tuple[str, ...]:
    # llama-server reports this name in its answers instead of the file path
    return ("--alias", name) if engine == "llama-server" else ()
