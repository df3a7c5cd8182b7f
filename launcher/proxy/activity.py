"""The request history: the last N requests in memory (GET /api/activity), optionally in SQLite.

One `record()` per answered request, called by the forwarder at its end: time, model, route,
status, prompt and completion tokens (from the usage / timings llama-server reports), time to
first byte, tokens/s, the key's name and the client's address. Bodies are kept only with
`capture_bodies` (debugging: they hold user data). The SQLite copy under lalo's state dir is
written in batches, off the event loop, and trimmed to its size cap.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.config import ActivityConfig
from launcher.proxy.auth import caller
from launcher.units import format_size

log = logging.getLogger(__name__)

CAPTURE_LIMIT = 64 * 1024  # bytes of a body kept with capture_bodies
FLUSH_INTERVAL = 2.0  # seconds between writes to the SQLite file
_COLUMNS = ("time", "model", "route", "status", "duration", "ttft", "prompt_tokens",
            "completion_tokens", "tokens_per_s", "key", "client", "request", "response",
            "params_changed")


@dataclass(frozen=True, slots=True)
class Entry:
    time: float  # unix seconds when the request arrived
    model: str
    route: str
    status: int
    duration: float  # seconds to the last byte
    ttft: float | None  # seconds to the first streamed byte
    prompt_tokens: int | None
    completion_tokens: int | None
    tokens_per_s: float | None
    key: str  # the key's name, never the key
    client: str
    request: str | None = None  # with capture_bodies only
    response: str | None = None
    # what the model's request rules changed: {parameter: [sent by the caller, sent on]}
    params_changed: dict[str, list[Any]] | None = None

    def row(self) -> dict[str, Any]:
        data = asdict(self)
        if data["request"] is None:
            del data["request"], data["response"]
        if data["params_changed"] is None:
            del data["params_changed"]
        return data


def usage_of(payload: bytes) -> tuple[int | None, int | None, float | None]:
    """Prompt tokens, completion tokens and decode tokens/s from an answer's last JSON."""
    if not payload:
        return None, None, None
    try:
        data: Any = json.loads(payload)
    except ValueError:
        return None, None, None
    if not isinstance(data, dict):
        return None, None, None
    usage: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
    timings: dict[str, Any] = data["timings"] if isinstance(data.get("timings"), dict) else {}
    prompt = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
    if prompt is None:
        prompt = _int(data.get("prompt_eval_count"))  # an Ollama-shaped answer
    completion = _int(usage.get("completion_tokens", usage.get("output_tokens")))
    if completion is None:
        completion = _int(timings.get("predicted_n"))
    if prompt is None:
        prompt = _int(timings.get("prompt_n"))
    per_second = timings.get("predicted_per_second")
    rate = round(float(per_second), 1) if isinstance(per_second, int | float) else None
    return prompt, completion, rate


class Activity:
    """Owns the history; only the event loop touches it."""

    def __init__(self, config: ActivityConfig | None = None, *, store_path: Path | None = None,
                 clock: Any = time.time) -> None:
        self.config = config or ActivityConfig()
        self.entries: collections.deque[Entry] = collections.deque(maxlen=self.config.size)
        self.total = 0
        self.per_model: collections.Counter[str] = collections.Counter()
        self._clock = clock
        # per key name: [requests, prompt tokens, completion tokens] (counters for /metrics)
        self.by_key: dict[str, list[int]] = {}
        self._store = _Store(store_path, self.config.store_max_size) \
            if self.config.store and store_path is not None else None
        if self._store is not None:
            # the last batch (up to FLUSH_INTERVAL of requests) is written when lalo exits
            atexit.register(self.close)
        self._pending: list[Entry] = []
        # one writer thread: batches never overlap on the connection, even when a trim's
        # VACUUM takes longer than FLUSH_INTERVAL
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lalo-activity") \
            if self._store is not None else None
        self._flusher: asyncio.TimerHandle | None = None

    def record(self, model: str, route: str, status: int, started: float,
               first_byte: float | None, usage: bytes, body: bytes = b"", *,
               counts: tuple[int | None, int | None, float | None] | None = None,
               params_changed: dict[str, list[Any]] | None = None) -> None:
        """One answered request; `started` and `first_byte` are perf_counter readings;
        `counts`: `usage_of(usage)` when the caller has read it already; `params_changed`: what
        the model's request rules changed (launcher.proxy.params)."""
        now = time.perf_counter()
        if counts is None:
            counts = usage_of(usage) if status < 400 else (None, None, None)
        prompt, completion, rate = counts
        who = caller()
        duration = now - started
        if rate is None and completion and duration > 0:
            rate = round(completion / duration, 1)
        entry = Entry(
            time=round(self._clock() - duration, 3), model=model, route=route, status=status,
            duration=round(duration, 4),
            ttft=round(first_byte - started, 4) if first_byte is not None else None,
            prompt_tokens=prompt, completion_tokens=completion, tokens_per_s=rate,
            key=who.key_name if who else "", client=who.client if who else "",
            request=_text(body) if self.config.capture_bodies else None,
            response=_text(usage) if self.config.capture_bodies else None,
            params_changed=params_changed,
        )
        self.entries.append(entry)
        self.total += 1
        self.per_model[model] += 1
        counters = self.by_key.setdefault(entry.key or "anonymous", [0, 0, 0])
        counters[0] += 1
        counters[1] += prompt or 0
        counters[2] += completion or 0
        if self._store is not None:
            self._pending.append(entry)
            if self._flusher is None:
                self._flusher = asyncio.get_running_loop().call_later(
                    FLUSH_INTERVAL, self._flush)

    def query(self, model: str | None = None, status: str | None = None,
              count: int = 100) -> list[dict[str, Any]]:
        """Newest first; `status` is a code (`200`) or a class (`2xx`, `4xx`, `error`)."""
        rows: list[dict[str, Any]] = []
        for entry in reversed(self.entries):
            if len(rows) >= count:
                break
            if model is not None and entry.model != model:
                continue
            if status is not None and not status_matches(entry.status, status):
                continue
            rows.append(entry.row())
        return rows

    def since(self, moment: float) -> Iterator[Entry]:
        """Entries that arrived after `moment` (unix seconds), oldest first."""
        for entry in reversed(self.entries):
            if entry.time + entry.duration <= moment:
                break
            yield entry

    def _flush(self) -> None:
        self._flusher = None
        batch, self._pending = self._pending, []
        if self._store is not None and self._writer is not None and batch:
            task = asyncio.get_running_loop().run_in_executor(self._writer, self._store.write,
                                                              batch)
            task.add_done_callback(_log_failure)

    def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self._writer is not None:
            self._writer.shutdown(wait=True)  # the batches already handed over go first
        if self._store is not None:
            if self._pending:
                try:
                    self._store.write(self._pending)
                except ActivityStoreError as exc:  # at exit: said, and lalo still stops
                    log.warning("activity: could not write the SQLite copy: %s", exc)
                self._pending = []
            self._store.close()


def status_matches(code: int, wanted: str) -> bool:
    wanted = wanted.lower()
    if wanted == "error":
        return code >= 400
    if len(wanted) == 3 and wanted.endswith("xx") and wanted[0].isdigit():
        return code // 100 == int(wanted[0])
    return wanted.isdigit() and code == int(wanted)


def valid_status_filter(wanted: str) -> bool:
    wanted = wanted.lower()
    return wanted == "error" or (len(wanted) == 3 and (
        wanted.isdigit() or (wanted[0].isdigit() and wanted.endswith("xx"))))


class ActivityStoreError(Exception):
    """The SQLite copy could not take a batch (a full disk): the message says where."""


class _Store:
    """The SQLite copy: appended in batches from a worker thread (sqlite3 blocks), one
    connection used by one thread at a time, oldest rows dropped past the size cap."""

    def __init__(self, path: Path, max_size: int) -> None:
        self.path = path
        self.max_size = max_size
        self._db: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._db = self._connect()
            except sqlite3.OperationalError:  # a full disk, a lock: the file itself is fine
                raise
            except sqlite3.DatabaseError as exc:
                # not a database (a copy cut short by hand, another program's file): kept
                # aside for a look, and a new store begins; rows already in it are lost
                aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
                os.replace(self.path, aside)
                log.warning("activity: %s could not be read (%s); moved to %s, starting a new one",
                            self.path, exc, aside.name)
                self._db = self._connect()
        return self._db

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # a power cut loses the last batch, never the file
            db.execute(f"CREATE TABLE IF NOT EXISTS activity ({', '.join(_COLUMNS)})")
            have = {row[1] for row in db.execute("PRAGMA table_info(activity)")}
            for column in _COLUMNS:  # a file from an older lalo: columns added since
                if column not in have:
                    db.execute(f"ALTER TABLE activity ADD COLUMN {column}")
            db.execute("SELECT count(*) FROM activity").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def write(self, batch: list[Entry]) -> None:
        try:
            self._write(batch)
        except sqlite3.Error as exc:  # a full disk, mostly: say where and how much room is left
            try:
                free = format_size(shutil.disk_usage(self.path.parent).free)
            except OSError:
                free = "unknown"
            raise ActivityStoreError(
                f"{self.path}: {exc} ({free} free there); {len(batch)} request(s) kept in memory "
                "only, the store is unchanged") from exc

    def _write(self, batch: list[Entry]) -> None:
        db = self._open()
        marks = ", ".join("?" for _ in _COLUMNS)
        with db:
            db.executemany(f"INSERT INTO activity ({', '.join(_COLUMNS)}) VALUES ({marks})",
                           [_values(e) for e in batch])
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        if pages * page_size > self.max_size:
            rows = db.execute("SELECT count(*) FROM activity").fetchone()[0]
            with db:  # drop the oldest quarter, then give the space back
                db.execute("DELETE FROM activity WHERE rowid IN (SELECT rowid FROM activity "
                           "ORDER BY rowid LIMIT ?)", (max(1, rows // 4),))
            db.execute("VACUUM")

    def rows(self) -> list[tuple[Any, ...]]:
        return self._open().execute("SELECT * FROM activity ORDER BY rowid").fetchall()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _values(entry: Entry) -> tuple[Any, ...]:
    """An entry as a row of the SQLite copy (what the rules changed as JSON text)."""
    changed = json.dumps(entry.params_changed) if entry.params_changed is not None else None
    return (*(getattr(entry, column) for column in _COLUMNS[:-1]), changed)


def _text(data: bytes) -> str:
    return data[:CAPTURE_LIMIT].decode("utf-8", errors="replace")


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("activity: could not write the SQLite copy: %s", future.exception())
