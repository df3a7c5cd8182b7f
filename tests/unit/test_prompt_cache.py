"""Slot files of the prompt cache: keyed by model file and settings, bounded, never fatal."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from launcher.config import parse_config
from launcher.engines.base import ServerSettings
from launcher.engines.llama_server import LlamaServerEngine
from launcher.engines.llamafile import LlamafileEngine
from launcher.supervisor.localhttp import JsonAnswer, LocalHttpError
from launcher.supervisor.prompt_cache import STALE_AFTER, SlotStore, cache_key
from launcher.supervisor.server_options import sleep_and_prompt_cache


def test_cache_key_follows_the_model_file_and_settings(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 10)
    binary = tmp_path / "llama-server"
    binary.write_bytes(b"b")
    key = cache_key(model, binary, 2048, 1, ())
    assert key == cache_key(model, binary, 2048, 1, ())
    assert key != cache_key(model, binary, 4096, 1, ())
    assert key != cache_key(model, binary, 2048, 2, ())
    assert key != cache_key(model, binary, 2048, 1, ("--cache-type-k", "q8_0"))
    model.write_bytes(b"y" * 11)  # a new file under the same name
    assert key != cache_key(model, binary, 2048, 1, ())


def test_prepare_drops_the_model_s_stale_keys_only(tmp_path: Path) -> None:
    old = SlotStore("smol", "oldkey", 1, root=tmp_path)
    assert old.prepare() is not None
    old.slot_file(0).write_bytes(b"old")
    recent = SlotStore("smol", "recentkey", 1, root=tmp_path)
    recent.prepare()
    recent.slot_file(0).write_bytes(b"another lalo's")
    other = SlotStore("gemma", "gkey", 1, root=tmp_path)
    other.prepare()
    other.slot_file(0).write_bytes(b"keep")
    long_ago = time.time() - STALE_AFTER - 60
    for path in (old.slot_file(0), old.directory):
        os.utime(path, (long_ago, long_ago))
    new = SlotStore("smol", "newkey", 1, root=tmp_path)
    assert new.prepare() == tmp_path / "smol" / "newkey"
    assert not old.directory.exists()
    # used lately: maybe another lalo sharing the cache (this removed a running test's folder,
    # and its model could not start again: "--slot-save-path: not a directory")
    assert recent.slot_file(0).read_bytes() == b"another lalo's"
    assert other.slot_file(0).read_bytes() == b"keep"


def test_ensure_makes_the_directory_again(tmp_path: Path) -> None:
    store = SlotStore("smol", "k", 1, root=tmp_path)
    assert store.prepare() is not None
    shutil.rmtree(store.directory)
    assert store.ensure() and store.directory.is_dir()


def test_prepare_failure_disables_the_cache(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert SlotStore("m", "k", 1, root=blocker).prepare() is None


def test_disk_bound_removes_least_recently_used_other_models_first(tmp_path: Path) -> None:
    stores = [SlotStore(name, "k", 1, root=tmp_path, max_bytes=250) for name in "abc"]
    for age, store in enumerate(stores):
        store.prepare()
        store.slot_file(0).write_bytes(b"z" * 100)
        os.utime(store.slot_file(0), (1000 + age, 1000 + age))
    # c's file is the oldest of all but it is the one just saved: a goes first
    os.utime(stores[2].slot_file(0), (10, 10))
    removed = stores[2].enforce_bound(keep=stores[2].directory)
    assert removed == [stores[0].slot_file(0)]
    assert stores[1].slot_file(0).exists() and stores[2].slot_file(0).exists()


class FakeSlots:
    """Answers slot actions as llama-server does (a double: the real one is in the
    integration test); writes the files the server would write."""

    def __init__(self, directory: Path, tokens: Mapping[int, int], fail: bool = False) -> None:
        self.directory = directory
        self.tokens = tokens
        self.fail = fail
        self.calls: list[str] = []

    async def __call__(self, method: str, url: str, headers: Mapping[str, str],
                       within: float, payload: Any) -> JsonAnswer:
        self.calls.append(url.split("/slots/")[1])
        if self.fail:
            raise LocalHttpError("connection refused")
        slot = int(url.split("/slots/")[1].split("?")[0])
        if "action=save" in url:
            (self.directory / payload["filename"]).write_bytes(b"kv" * (self.tokens[slot] + 1))
            return JsonAnswer(200, {"n_saved": self.tokens[slot], "timings": {"save_ms": 5.0}})
        if slot == 1:
            return JsonAnswer(400, {"error": {"message": "invalid slot save file"}})
        return JsonAnswer(200, {"n_restored": self.tokens[slot], "timings": {"restore_ms": 2}})


async def test_save_and_restore_keep_only_slots_with_prompts(tmp_path: Path) -> None:
    notes: list[str] = []
    store = SlotStore("m", "k", 3, root=tmp_path, note=notes.append)
    directory = store.prepare()
    assert directory is not None
    server = FakeSlots(directory, {0: 1500, 1: 40, 2: 0})
    store._request = server
    saved = await store.save("http://x", "key")
    assert [(o.slot, o.tokens) for o in saved] == [(0, 1500), (1, 40)]
    assert store.slot_file(0).exists() and store.slot_file(1).exists()
    assert not store.slot_file(2).exists() and not list(directory.glob("*.part"))
    assert store.saved_by_server() == []  # lalo's own files, not the server's at a sleep
    restored = await store.restore("http://x", "key")
    assert [(o.slot, o.tokens) for o in restored] == [(0, 1500)]
    assert not store.slot_file(1).exists()  # refused by the server: deleted
    assert any("slot 1 restore refused (400): invalid slot save file" in n for n in notes)


def test_slots_the_server_saved_as_it_slept_are_noted_and_bounded(tmp_path: Path) -> None:
    notes: list[str] = []
    other = SlotStore("other", "k", 1, root=tmp_path)
    other.prepare()
    other.slot_file(0).write_bytes(b"o" * 100)
    os.utime(other.slot_file(0), (10, 10))
    store = SlotStore("m", "k", 3, root=tmp_path, max_bytes=200, note=notes.append)
    store.prepare()
    store.slot_file(0).write_bytes(b"z" * 100)  # saved by an earlier stop: not this sleep's
    os.utime(store.slot_file(0), (1000, 1000))
    store.slot_file(2).write_bytes(b"z" * 50)  # written by the server as it went to sleep
    assert store.saved_by_server() == [store.slot_file(2)]
    assert notes == ["prompt cache: the server saved 1 slot(s) (50 B) as it went to sleep"]
    # 200 bytes at most: the other model's older file goes, this model's stay
    assert not other.slot_file(0).exists() and store.slot_file(0).exists()
    # the next sleep: the server saved nothing new (the files are older than the last look)
    os.utime(store.slot_file(2), (time.time() - 5, time.time() - 5))
    assert store.saved_by_server() == [] and len(notes) == 1


async def test_an_unreachable_server_fails_nothing(tmp_path: Path) -> None:
    store = SlotStore("m", "k", 2, root=tmp_path)
    directory = store.prepare()
    assert directory is not None
    store.slot_file(0).write_bytes(b"kv")
    store._request = FakeSlots(directory, {}, fail=True)
    assert await store.save("http://x", "") == []
    assert await store.restore("http://x", "") == []


def test_options_only_for_llama_server(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("LALO_CACHE_DIR", str(tmp_path))
    cfg = parse_config("models:\n  a: {file: a.gguf, sleep_after: 9}\n", label="t").models["a"]
    base = ServerSettings(model_path=tmp_path / "a.gguf", host="127.0.0.1", port=0, api_key="",
                          ctx_size=512, parallel=1, threads=None)
    settings, store = sleep_and_prompt_cache("a", cfg, base, LlamaServerEngine(tmp_path / "ls"),
                                             1024)
    assert settings.sleep_after == 9 and store is not None
    assert settings.slot_save_path == store.directory and store.directory.is_dir()
    assert store.directory.is_relative_to(tmp_path / "prompt-cache")
    off = parse_config("models:\n  a: {file: a.gguf, prompt_cache: false}\n", label="t")
    settings, store = sleep_and_prompt_cache("a", off.models["a"], base,
                                             LlamaServerEngine(tmp_path / "ls"), 1024)
    assert store is None and settings.slot_save_path is None
    settings, store = sleep_and_prompt_cache("a", cfg, base, LlamafileEngine(tmp_path / "rt"), 1)
    assert store is None and settings == base


def test_sliding_window_models_need_swa_full(tmp_path: Path, monkeypatch: Any) -> None:
    # this llama-server recomputes a restored prompt of a sliding-window model (Gemma 3)
    # unless its SWA cache is full-size: measured in docs/scheduling.md
    monkeypatch.setenv("LALO_CACHE_DIR", str(tmp_path))
    cfg = parse_config("models:\n  g: {file: g.gguf}\n", label="t").models["g"]
    base = ServerSettings(model_path=tmp_path / "g.gguf", host="127.0.0.1", port=0, api_key="",
                          ctx_size=512, parallel=1, threads=None)
    engine = LlamaServerEngine(tmp_path / "ls")
    _, store = sleep_and_prompt_cache("g", cfg, base, engine, 1024, sliding_window=True)
    assert store is None
    full = ServerSettings(**{**base.__dict__, "extra_args": ("--swa-full",)})
    settings, store = sleep_and_prompt_cache("g", cfg, full, engine, 1024, sliding_window=True)
    assert store is not None and settings.slot_save_path == store.directory
