"""The running lalo instance on disk: a lock, a state file (0600), and the children it started.

The lock is an OS file lock (filelock), released by the kernel when the process dies, so a killed
lalo never blocks the next one. Child records (pid + create time) let the next `lalo up`
reap servers a dead instance left behind without ever killing an unrelated process.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from launcher import paths
from launcher.errors import AlreadyRunningError, NotRunningError, StartupError
from launcher.paths import write_private_json
from launcher.supervisor import platform

STATE_FILE = "instance.json"
LOCK_FILE = "instance.lock"
CHILDREN_FILE = "children.json"


@dataclass(frozen=True)
class InstanceInfo:
    pid: int
    created: float
    url: str
    started_at: float
    admin_token: str
    config: str
    version: str
    log_dir: str

    def is_alive(self) -> bool:
        return platform.is_same_process(self.pid, self.created)


class InstanceLock:
    """Held for the life of `lalo up`; a second holder gets AlreadyRunningError naming the URL."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.dir = state_dir or paths.state_dir()
        self._lock = FileLock(self.dir / LOCK_FILE)

    def acquire(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(timeout=0)
        except Timeout:
            running = read_instance(self.dir)
            where = f" at {running.url} (pid {running.pid})" if running else ""
            raise AlreadyRunningError(
                f"lalo is already running{where}; stop it with `lalo down`"
            ) from None
        except OSError as exc:
            raise StartupError(
                f"cannot write lalo's state folder {self.dir}: {exc.strerror}; "
                "set LALO_STATE_DIR to a writable folder"
            ) from None

    def release(self) -> None:
        if self._lock.is_locked:
            with contextlib.suppress(OSError):
                (self.dir / STATE_FILE).unlink(missing_ok=True)
            self._lock.release()

    def publish(self, info: InstanceInfo) -> None:
        write_private_json(self.dir / STATE_FILE, asdict(info))


def read_instance(state_dir: Path | None = None) -> InstanceInfo | None:
    """The live instance's info, or None (a state file of a dead instance does not count)."""
    path = (state_dir or paths.state_dir()) / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        info = InstanceInfo(**data)
    except (OSError, ValueError, TypeError):
        return None
    return info if info.is_alive() else None


def require_instance(state_dir: Path | None = None) -> InstanceInfo:
    info = read_instance(state_dir)
    if info is None:
        raise NotRunningError("lalo is not running (start it with `lalo up`)")
    return info


class ChildRecords:
    """pid and create time of every model server this instance started, on disk."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.path = (state_dir or paths.state_dir()) / CHILDREN_FILE
        self._records: dict[str, dict[str, Any]] = {}

    def reap_stale(self) -> list[int]:
        """Kill servers recorded by a dead instance (pid and create time must both match)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        killed = []
        owner = data.get("owner", {})
        if owner and platform.is_same_process(int(owner.get("pid", 0)), float(owner.get("created", 0))):
            return []  # that instance is alive: not ours to touch
        for record in data.get("children", {}).values():
            with contextlib.suppress(KeyError, TypeError, ValueError):
                if platform.reap_recorded(int(record["pid"]), float(record["created"])):
                    killed.append(int(record["pid"]))
        self.path.unlink(missing_ok=True)
        return killed

    def add(self, name: str, pid: int, created: float, port: int) -> None:
        self._records[name] = {"pid": pid, "created": created, "port": port, "at": time.time()}
        self._save()

    def remove(self, name: str, pid: int) -> None:
        if self._records.get(name, {}).get("pid") == pid:
            del self._records[name]
            self._save()

    def _save(self) -> None:
        me = os.getpid()
        write_private_json(self.path, {
            "owner": {"pid": me, "created": platform.create_time(me) or 0.0},
            "children": self._records,
        })
