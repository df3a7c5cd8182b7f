"""The llama-server options behind sleeping and the prompt cache, per model, from its config."""

from __future__ import annotations

import dataclasses

from launcher.config import ModelConfig
from launcher.engines.base import Engine, ServerSettings
from launcher.engines.llama_server import LlamaServerEngine
from launcher.supervisor.prompt_cache import SlotStore, cache_key


def sleep_and_prompt_cache(
    name: str, cfg: ModelConfig, settings: ServerSettings, engine: Engine, max_bytes: int,
) -> tuple[ServerSettings, SlotStore | None]:
    """`settings` with `sleep_after` and the slot directory set, and the model's slot store.

    Only llama-server has both; the store is None when the prompt cache is off or its
    directory cannot be made (a start never fails for it).
    """
    if not isinstance(engine, LlamaServerEngine):
        return settings, None
    settings = dataclasses.replace(settings, sleep_after=cfg.sleep_after)
    if not cfg.prompt_cache:
        return settings, None
    key = cache_key(settings.model_path, engine.binary, settings.ctx_size, settings.parallel,
                    settings.extra_args)
    store = SlotStore(name, key, settings.parallel, max_bytes=max_bytes)
    directory = store.prepare()
    if directory is None:
        return settings, None
    return dataclasses.replace(settings, slot_save_path=directory), store
