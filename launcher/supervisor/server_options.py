"""The llama-server options behind sleeping and the prompt cache, per model, from its config."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from launcher.config import ModelConfig
from launcher.engines.base import Engine, ServerSettings
from launcher.engines.llama_server import LlamaServerEngine, kv_cache_args
from launcher.models.gguf_file import GGUFInfo
from launcher.supervisor.prompt_cache import SlotStore, cache_key

log = logging.getLogger(__name__)


def uses_sliding_window(info: GGUFInfo | None) -> bool:
    """Whether the model has sliding-window attention layers (Gemma 2/3, some Mistral, ...)."""
    return info is not None and int(info.arch_value("attention.sliding_window", 0) or 0) > 0


def sleep_and_prompt_cache(
    name: str, cfg: ModelConfig, settings: ServerSettings, engine: Engine, max_bytes: int,
    *, sliding_window: bool = False, note: Callable[[str], None] = lambda line: None,
) -> tuple[ServerSettings, SlotStore | None]:
    """`settings` with `sleep_after` and the slot directory set, and the model's slot store.

    Only llama-server has both; the store is None when the prompt cache is off or its
    directory cannot be made (a start never fails for it), and for a model with sliding-window
    attention unless it runs with `--swa-full`: this llama-server recomputes such a model's
    restored prompt anyway (it needs context checkpoints that the slot file does not hold).
    `note`: where the store says what it did (the model's log).
    """
    if not isinstance(engine, LlamaServerEngine):
        return settings, None
    settings = dataclasses.replace(settings, sleep_after=cfg.sleep_after)
    if not cfg.prompt_cache:
        return settings, None
    if sliding_window and "--swa-full" not in settings.extra_args:
        log.info("%s: prompt cache off: sliding-window attention recomputes a restored prompt "
                 "(add args: [--swa-full] to keep it, at the cost of a full-size KV cache)", name)
        return settings, None
    # a slot file holds the KV cells in the cache's type: one saved from f16 cannot fill q8_0
    key = cache_key(settings.model_path, engine.binary, settings.ctx_size, settings.parallel,
                    (*kv_cache_args(settings.kv_cache), *settings.extra_args))
    store = SlotStore(name, key, settings.parallel, max_bytes=max_bytes, note=note)
    directory = store.prepare()
    if directory is None:
        return settings, None
    return dataclasses.replace(settings, slot_save_path=directory), store
