"""Everything that differs between operating systems about child processes, in one place.

Linux: own session (so the group can be killed) and PR_SET_PDEATHSIG (the kernel kills
the child when lalo dies, even by SIGKILL). Other POSIX: own session only. Windows: a Job
Object with KILL_ON_JOB_CLOSE (written, not tested here).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import psutil

log = logging.getLogger(__name__)

IS_WINDOWS = sys.platform == "win32"
IS_LINUX = sys.platform.startswith("linux")
_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(parent: int) -> None:
    """Runs in the child between fork and exec: die with SIGKILL when the parent thread dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)
    # the parent may have died between fork and prctl: then we are orphaned already. Compare
    # with the parent's pid, not with 1: in a container lalo itself is pid 1.
    if os.getppid() != parent:
        os._exit(127)


async def spawn(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    stdout: int = asyncio.subprocess.PIPE,
) -> asyncio.subprocess.Process:
    """Start `argv` in its own session/group, tied to our life where the OS allows."""
    full_env = {**os.environ, **env}
    kwargs: dict[str, Any] = {}
    if IS_WINDOWS:
        kwargs["creationflags"] = 0x00000200  # CREATE_NEW_PROCESS_GROUP
    else:
        kwargs["start_new_session"] = True
        if IS_LINUX:
            kwargs["preexec_fn"] = functools.partial(set_parent_death_signal, os.getpid())
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=asyncio.subprocess.STDOUT,
        env=full_env,
        **kwargs,
    )
    if IS_WINDOWS:
        _windows_job().assign(process.pid)
    return process


def terminate_group(pid: int) -> None:
    """Ask the child's whole process group to stop (SIGTERM / CTRL_BREAK)."""
    _signal_group(pid, signal.CTRL_BREAK_EVENT if IS_WINDOWS else signal.SIGTERM)  # type: ignore[attr-defined,unused-ignore]


def kill_group(pid: int) -> None:
    """Kill the child's whole process group, no questions asked."""
    if IS_WINDOWS:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(pid).children(recursive=True):
                child.kill()
            psutil.Process(pid).kill()
        return
    _signal_group(pid, signal.SIGKILL)


def _signal_group(pid: int, sig: int) -> None:
    if IS_WINDOWS:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
        return
    try:
        os.killpg(pid, sig)  # the child leads its own session, so its pgid is its pid
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def stop_signal_continue(pid: int) -> None:
    """Resume a stopped (SIGSTOP) group so that SIGTERM can be handled."""
    if not IS_WINDOWS:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGCONT)


def create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def is_same_process(pid: int, created: float) -> bool:
    """True if `pid` is still the running process started at `created` (pids get reused;
    a zombie waiting for its parent to reap it has exited and does not count)."""
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - created) < 0.05 and \
            process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def reap_recorded(pid: int, created: float) -> bool:
    """Kill a child recorded by a dead lalo, only if pid *and* start time still match."""
    if not is_same_process(pid, created):
        return False
    log.warning("killing orphaned model server pid %d left by a previous lalo", pid)
    stop_signal_continue(pid)
    kill_group(pid)
    return True


def rss_of(pid: int, children: bool = False) -> int | None:
    """Resident memory of the process, plus its children's if asked (a llamafile runs under
    sh; finding children scans every process on the machine, so only then)."""
    try:
        process = psutil.Process(pid)
        total = int(process.memory_info().rss)
        for child in process.children(recursive=True) if children else ():
            with contextlib.suppress(psutil.Error):
                total += int(child.memory_info().rss)
        return total
    except psutil.Error:
        return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (another process may take it before the child binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Whether another socket holds `port` (connections in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if not IS_WINDOWS:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


class _WindowsJob:
    """A Job Object that kills every assigned process when lalo's handle closes (lalo exits)."""

    def __init__(self) -> None:
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        self._kernel32 = kernel32
        self._handle = kernel32.CreateJobObjectW(None, None)
        if not self._handle:
            raise OSError("CreateJobObjectW failed")

        class _BasicLimits(ctypes.Structure):
            _fields_ = [
                ("PerProcessUserTimeLimit", ctypes.c_int64),
                ("PerJobUserTimeLimit", ctypes.c_int64),
                ("LimitFlags", ctypes.c_uint32),
                ("MinimumWorkingSetSize", ctypes.c_size_t),
                ("MaximumWorkingSetSize", ctypes.c_size_t),
                ("ActiveProcessLimit", ctypes.c_uint32),
                ("Affinity", ctypes.c_size_t),
                ("PriorityClass", ctypes.c_uint32),
                ("SchedulingClass", ctypes.c_uint32),
            ]

        class _IoCounters(ctypes.Structure):
            _fields_ = [(name, ctypes.c_uint64) for name in (
                "ReadOperationCount", "WriteOperationCount", "OtherOperationCount",
                "ReadTransferCount", "WriteTransferCount", "OtherTransferCount")]

        class _ExtendedLimits(ctypes.Structure):
            _fields_ = [
                ("BasicLimitInformation", _BasicLimits),
                ("IoInfo", _IoCounters),
                ("ProcessMemoryLimit", ctypes.c_size_t),
                ("JobMemoryLimit", ctypes.c_size_t),
                ("PeakProcessMemoryUsed", ctypes.c_size_t),
                ("PeakJobMemoryUsed", ctypes.c_size_t),
            ]

        limits = _ExtendedLimits()
        limits.BasicLimitInformation.LimitFlags = 0x2000  # JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
        info_class = 9  # JobObjectExtendedLimitInformation
        if not kernel32.SetInformationJobObject(
            self._handle, info_class, ctypes.byref(limits), ctypes.sizeof(limits)
        ):
            raise OSError("SetInformationJobObject failed")

    def assign(self, pid: int) -> None:
        process_all_access = 0x1F0FFF
        handle = self._kernel32.OpenProcess(process_all_access, False, pid)
        if not handle:
            raise OSError(f"OpenProcess({pid}) failed")
        try:
            if not self._kernel32.AssignProcessToJobObject(self._handle, handle):
                raise OSError(f"AssignProcessToJobObject({pid}) failed")
        finally:
            self._kernel32.CloseHandle(handle)


_job: _WindowsJob | None = None


def _windows_job() -> _WindowsJob:
    global _job
    if _job is None:
        _job = _WindowsJob()
    return _job
