"""Several hosts on one machine: network namespaces joined by veth pairs to one bridge.

The bridge lives in a namespace of its own (a hub), so that the host's firewall (podman and
docker set the FORWARD policy to DROP) never sees the traffic between members; the test's own
namespace is joined to the hub too, so the test reaches every member. Root only (`ip netns`).
Everything is removed by `close()`, which also kills the processes still running inside.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import psutil

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def netns_available() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that no interface of this machine uses yet."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True,
                          check=False).stdout
    start = os.getpid() % 250
    for step in range(250):
        third = (start + step) % 250
        if f" 10.213.{third}." not in used:
            return ipaddress.ip_network(f"10.213.{third}.0/24")
    raise RuntimeError("no free /24 in 10.213.0.0/16")


class Network:
    """A hub with a bridge; `add(name)` makes a namespace on it and returns its address."""

    def __init__(self) -> None:
        self.tag = f"lp{os.getpid() % 100000}"  # names unique per test process, short (IFNAMSIZ)
        self.subnet = _free_subnet()
        self.hub = f"{self.tag}-hub"
        self.members: dict[str, str] = {}  # namespace -> address
        self._links = 0
        _ip("netns", "add", self.hub)
        try:
            _ip("link", "add", "br0", "type", "bridge", netns=self.hub)
            _ip("link", "set", "br0", "up", netns=self.hub)
            # the test's namespace: its end keeps the subnet's first address
            self.address = self._join(None)
        except BaseException:
            self.close()
            raise

    def _join(self, netns: str | None) -> str:
        self._links += 1
        outer, inner = f"{self.tag}h{self._links}", f"{self.tag}n{self._links}"
        address = str(self.subnet.network_address + self._links)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", outer, "netns", self.hub)
        _ip("link", "set", outer, "master", "br0", netns=self.hub)
        _ip("link", "set", outer, "up", netns=self.hub)
        if netns is not None:
            _ip("link", "set", inner, "netns", netns)
        _ip("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", inner, netns=netns)
        _ip("link", "set", inner, "up", netns=netns)
        return address

    def add(self, name: str) -> tuple[str, str]:
        """A new namespace on the bridge (loopback up): (its name, its address)."""
        netns = f"{self.tag}-{name}"
        _ip("netns", "add", netns)
        self.members[netns] = ""
        _ip("link", "set", "lo", "up", netns=netns)
        address = self._join(netns)
        self.members[netns] = address
        return netns, address

    def close(self) -> None:
        """Kill whatever still runs in the namespaces, then delete them (the veths go too)."""
        for netns in [*self.members, self.hub]:
            kill_inside(netns)
            subprocess.run(["ip", "netns", "delete", netns], capture_output=True, check=False)
        # a veth whose namespace is gone takes its peer along; this catches one half-made
        for index in range(1, self._links + 2):
            subprocess.run(["ip", "link", "delete", f"{self.tag}n{index}"], capture_output=True,
                           check=False)
        self.members.clear()


def pids_inside(netns: str) -> Sequence[int]:
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                          check=False)
    return [int(p) for p in done.stdout.split()]


def kill_inside(netns: str) -> None:
    for pid in pids_inside(netns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids_inside(netns):
        try:
            psutil.Process(pid).wait(10)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass


class LoopbackOnly:
    """A network namespace with only loopback up: what "no network" means for a test. `argv`
    runs a command inside it; `call` runs a function whose sockets open inside it."""

    def __init__(self, prefix: str = "lalo-lo") -> None:
        self.name = f"{prefix}-{os.getpid()}"
        _ip("netns", "add", self.name)
        _ip("link", "set", "lo", "up", netns=self.name)

    def argv(self, command: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def call(self, call: Callable[[], T]) -> T:
        return in_namespace(f"/run/netns/{self.name}", call)

    def close(self) -> None:
        kill_inside(self.name)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


def in_namespace(path: str, call: Callable[[], T]) -> T:
    """`call()` on a thread moved into the network namespace at `path` (`/proc/PID/ns/net`,
    `/run/netns/NAME`): sockets it opens live there; the thread, and the move, end after."""
    libc = ctypes.CDLL(None, use_errno=True)
    outcome: list[T] = []
    failure: list[BaseException] = []

    def moved() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            outcome.append(call())
        except BaseException as exc:  # raised again on the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=moved)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
