"""Keep a model's cached prompts across a stop: llama-server's slot save before, restore after.

A llama-server started with `--slot-save-path DIR` writes a slot's tokens and its KV cache to
`DIR/NAME` on `POST /slots/ID?action=save` and reads them back on `action=restore`. The file
is only valid for the same model file, the same context per slot and KV settings, and the same
llama.cpp build, so each model gets one directory per such combination (`cache_key`) and the
directories of older combinations are dropped. Disk use has a bound over all models (oldest
files go first). Saving and restoring never fail a stop or a start: problems are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import paths
from launcher.supervisor.localhttp import JsonAnswer, LocalHttpError, request_json
from launcher.units import format_size

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 2 * 1024**3
_SUFFIX = ".slot"

Requester = Callable[[str, str, Mapping[str, str], float, Any], Awaitable[JsonAnswer]]
"""(method, url, headers, seconds, JSON payload) -> answer; raises LocalHttpError."""


def cache_root() -> Path:
    return paths.cache_dir() / "prompt-cache"


def _identity(path: Path) -> str:
    try:
        stat = path.stat()
    except OSError:
        return f"{path}|missing"
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def cache_key(model_path: Path, engine_binary: Path | None, ctx_size: int, parallel: int,
              extra_args: Sequence[str]) -> str:
    """What a slot file depends on: the model file, the engine build, context, slots, KV flags."""
    parts = [
        _identity(model_path),
        _identity(engine_binary) if engine_binary is not None else "-",
        f"ctx={ctx_size}", f"np={parallel}", *extra_args,
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


STALE_AFTER = 7 * 24 * 3600  # a key directory unused this long is removed at the next start


@dataclass(frozen=True)
class SlotOutcome:
    slot: int
    tokens: int
    seconds: float


class SlotStore:
    """One model's slot files: where llama-server writes them, saving, restoring, the disk bound."""

    def __init__(
        self,
        model: str,
        key: str,
        slots: int,
        *,
        root: Path | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout: float = 10.0,  # per slot action: a hung server must not hold up a stop long
        requester: Requester = request_json,
        note: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.model = model
        self.key = key
        self.slots = slots
        self.root = root or cache_root()
        self.directory = self.root / _safe(model) / key
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._request = requester
        self._note = note  # where it says what it did: the model's log
        self.saved: list[SlotOutcome] = []  # the last save
        self._seen = time.time()  # slot files written since were written by the server
        self.restored: list[SlotOutcome] = []  # the last restore

    def prepare(self, now: float | None = None) -> Path | None:
        """Create this key's directory and drop the model's other keys that nothing used for
        STALE_AFTER seconds; None if the directory cannot be made.

        Another key is another model file, build or setting: its slot files would not load
        here. A recent one may belong to another lalo sharing this cache (another config, a
        test run): it stays until it goes stale or the disk bound removes its files.
        """
        if not self.ensure():
            return None
        for partial in self.directory.glob(f"*{_SUFFIX}.part"):  # a save cut by a kill or power cut
            with contextlib.suppress(OSError):
                partial.unlink()
        cutoff = (time.time() if now is None else now) - STALE_AFTER
        for other in self.directory.parent.iterdir():
            if other.is_dir() and other.name != self.key and _last_used(other) < cutoff:
                shutil.rmtree(other, ignore_errors=True)
        return self.directory

    def ensure(self) -> bool:
        """The directory exists (again: another lalo may have removed it); False if it cannot."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            log.warning("%s: prompt cache disabled: cannot create %s: %s",
                        self.model, self.directory, exc)
            return False
        return True

    def slot_file(self, slot: int) -> Path:
        return self.directory / f"slot-{slot}{_SUFFIX}"

    async def save(self, base_url: str, api_key: str) -> list[SlotOutcome]:
        """Save every slot that holds a prompt; a slot without one keeps its older file.

        All slots are asked at once: this sits on a swap's path (the next model waits for the
        memory), and the round trips, not the server's work, are most of a small slot's cost.
        """
        outcomes = await asyncio.gather(*(self._save(base_url, api_key, slot)
                                          for slot in range(self.slots)))
        self.saved = [outcome for outcome in outcomes if outcome is not None]
        self._seen = time.time()  # these files are lalo's
        if self.saved:
            total = sum(o.tokens for o in self.saved)
            self._note(f"prompt cache: saved {total} tokens from {len(self.saved)} slot(s)")
        self.enforce_bound(keep=self.directory)
        return self.saved

    async def _save(self, base_url: str, api_key: str, slot: int) -> SlotOutcome | None:
        temp = f"slot-{slot}{_SUFFIX}.part"
        answer = await self._action(base_url, api_key, slot, "save", temp)
        tokens = _int(answer, "n_saved")
        written = self.directory / temp
        size = _int(answer, "n_written")
        if tokens and size is not None and _size(written) != size:
            self._warn(f"slot {slot}: the server wrote {_size(written)} of {size} bytes to {written}; "
                       f"{_free(self.directory)}")
            tokens = None
        if not tokens:  # refused (None), short (a full disk) or an empty slot (0): nothing to keep
            with contextlib.suppress(OSError):
                written.unlink()
            return None
        try:
            # the bytes on disk before the name: after a power cut a slot file is whole or
            # absent (llama-server aborts on a truncated one: GGML_ASSERT(nread <= state_size))
            _sync(written)
            os.replace(written, self.slot_file(slot))
            _sync(self.directory)
        except OSError as exc:
            self._warn(f"cannot keep the saved slot {slot}: {exc}")
            return None
        return SlotOutcome(slot, tokens, _ms(answer, "save_ms"))

    async def restore(self, base_url: str, api_key: str) -> list[SlotOutcome]:
        """Load each saved slot back, all at once (the model is not ready before); a file the
        server refuses is deleted."""
        outcomes = await asyncio.gather(*(self._restore(base_url, api_key, slot)
                                          for slot in range(self.slots)
                                          if self.slot_file(slot).is_file()))
        self.restored = [outcome for outcome in outcomes if outcome is not None]
        if self.restored:
            total = sum(o.tokens for o in self.restored)
            self._note(f"prompt cache: restored {total} tokens into {len(self.restored)} slot(s)")
        return self.restored

    async def _restore(self, base_url: str, api_key: str, slot: int) -> SlotOutcome | None:
        path = self.slot_file(slot)
        answer = await self._action(base_url, api_key, slot, "restore", path.name)
        tokens = _int(answer, "n_restored")
        if tokens is None:
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: the disk bound removes it last
        return SlotOutcome(slot, tokens, _ms(answer, "restore_ms"))

    def saved_by_server(self) -> list[Path]:
        """The slot files the server wrote itself since this store last looked or saved: lalo's
        engine, started with `--sleep-save-slots`, saves its slots as it goes to sleep (and
        restores them when it wakes). Said in the model's log, and counted in the disk bound."""
        since, self._seen = self._seen, time.time()
        fresh: list[Path] = []
        for slot in range(self.slots):
            path = self.slot_file(slot)
            with contextlib.suppress(OSError):
                if path.stat().st_mtime >= since:
                    fresh.append(path)
        if fresh:
            size = sum(_size(path) for path in fresh)
            self._note(f"prompt cache: the server saved {len(fresh)} slot(s) "
                       f"({format_size(size)}) as it went to sleep")
            self.enforce_bound(keep=self.directory)
        return fresh

    def enforce_bound(self, keep: Path | None = None) -> list[Path]:
        """Delete the least recently used slot files of all models until under `max_bytes`."""
        files: list[tuple[float, int, Path]] = []
        for path in self.root.glob(f"*/*/*{_SUFFIX}"):
            with contextlib.suppress(OSError):
                stat = path.stat()
                files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        removed: list[Path] = []
        # this model's fresh files go last; oldest first among the rest
        for _, size, path in sorted(files, key=lambda f: (f[2].parent == keep, f[0])):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
                total -= size
        if removed:
            log.info("prompt cache: removed %d old slot file(s) to stay under %d bytes",
                     len(removed), self.max_bytes)
        return removed

    async def _action(self, base_url: str, api_key: str, slot: int, action: str,
                      filename: str) -> JsonAnswer | None:
        url = f"{base_url}/slots/{slot}?action={action}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        started = time.monotonic()
        try:
            answer = await self._request("POST", url, headers, self.timeout, {"filename": filename})
        except LocalHttpError as exc:
            self._warn(f"slot {slot} {action} failed: {exc}")
            return None
        if answer.status != 200:
            message = _error_message(answer.body)
            where = f"; {_free(self.directory)}" if action == "save" else ""
            self._warn(f"slot {slot} {action} refused ({answer.status}): {message}{where}")
            return None
        log.debug("%s: slot %d %s in %.3f s", self.model, slot, action, time.monotonic() - started)
        return answer

    def _warn(self, message: str) -> None:
        log.warning("%s: prompt cache: %s", self.model, message)
        self._note(f"prompt cache: {message}")


def _sync(path: Path) -> None:
    """fsync a file or a directory (the server wrote the file; its pages are the same); best
    effort: Windows opens no directory this way."""
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _free(directory: Path) -> str:
    """How much room the prompt cache has, for a save that failed (a full disk, mostly)."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        return f"cannot read the free space of {directory}: {exc.strerror}"
    return f"{format_size(free)} free in {directory} (the served model is not affected)"


def _int(answer: JsonAnswer | None, field: str) -> int | None:
    if answer is None or not isinstance(answer.body, dict):
        return None
    value = answer.body.get(field)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _ms(answer: JsonAnswer | None, field: str) -> float:
    if answer is None or not isinstance(answer.body, dict):
        return 0.0
    timings = answer.body.get("timings")
    value = timings.get(field) if isinstance(timings, dict) else None
    return float(value) / 1000.0 if isinstance(value, int | float) else 0.0


def _error_message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))
    return str(body)[:200]


def _last_used(directory: Path) -> float:
    """The newest mtime of a key directory and its files (a save or restore touches them)."""
    try:
        return max([directory.stat().st_mtime,
                    *(entry.stat().st_mtime for entry in directory.iterdir())])
    except OSError:
        return 0.0


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"
