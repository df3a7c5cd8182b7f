"""The thread governor (launcher/supervisor/governor.py) against a fake `POST /threads`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from launcher.supervisor.governor import ThreadGovernor
from launcher.supervisor.state import Endpoint


def at(pid: int) -> Endpoint:
    return Endpoint(base_url=f"http://127.0.0.1:{9000 + pid}", api_key="k", pid=pid)


NAMES = {1: "a", 2: "b"}


class Servers:
    def __init__(self, failing: set[str] | None = None) -> None:
        self.posted = asyncio.Event()  # set at each POST /threads
        self.threads: dict[str, int] = {}
        self.posts: list[tuple[str, int]] = []
        self.failing = failing or set()

    async def post(self, endpoint: Endpoint, count: int) -> None:
        await asyncio.sleep(0)
        name = NAMES[endpoint.pid]
        self.posts.append((name, count))
        if name in self.failing:
            self.posted.set()
            raise ConnectionError("no route")
        self.threads[name] = count
        self.posted.set()


async def until(servers: Servers, condition: Callable[[], bool]) -> None:
    """Wait for the governor's posts to make `condition` true (a deadline, never a fixed sleep)."""
    async with asyncio.timeout(5.0):
        while not condition():
            servers.posted.clear()
            await servers.posted.wait()
        for _ in range(20):  # the governor records what the posts answered when all are back
            await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_busy_servers_share_and_one_alone_gets_all() -> None:
    servers = Servers()
    governor = ThreadGovernor(4, servers.post, settle=0.05, interval=10)
    governor.start()
    try:
        governor.ready("a", at(1))
        governor.ready("b", at(2))
        await until(servers, lambda: servers.threads == {"a": 4, "b": 4})  # nothing busy: either may take all
        governor.busy("a", True)
        # b holds what it would get if it became busy next
        await until(servers, lambda: servers.threads == {"a": 4, "b": 2})
        governor.busy("b", True)
        await until(servers, lambda: servers.threads == {"a": 2, "b": 2})
        assert governor.threads("a") == 2 and governor.share.busy == ("a", "b")
    finally:
        await governor.stop()


@pytest.mark.asyncio
async def test_an_idle_gap_shorter_than_settle_changes_nothing() -> None:
    servers = Servers()
    governor = ThreadGovernor(4, servers.post, settle=1.0, interval=10)
    governor.start()
    try:
        for name, pid in (("a", 1), ("b", 2)):
            governor.ready(name, at(pid))
            governor.busy(name, True)
        await until(servers, lambda: servers.threads == {"a": 2, "b": 2})
        before = len(servers.posts)
        governor.busy("b", False)  # between two requests of one conversation
        await asyncio.sleep(0.05)
        governor.busy("b", True)
        await asyncio.sleep(1.2)  # past the settle time of the first idle report: it was dropped
        assert len(servers.posts) == before and servers.threads == {"a": 2, "b": 2}
        governor.busy("b", False)  # really done: a gets every CPU after settle
        await until(servers, lambda: servers.threads == {"a": 4, "b": 2})
    finally:
        await governor.stop()


@pytest.mark.asyncio
async def test_a_server_that_refuses_is_tried_again_and_a_gone_one_forgotten() -> None:
    servers = Servers(failing={"b"})
    governor = ThreadGovernor(2, servers.post, settle=0.01, interval=10)
    governor.start()
    try:
        governor.ready("a", at(1))
        governor.ready("b", at(2))
        governor.busy("a", True)
        await until(servers, lambda: ("b", 1) in servers.posts)
        assert governor.threads("b") is None
        servers.failing.clear()
        governor.busy("b", True)
        await until(servers, lambda: servers.threads == {"a": 1, "b": 1})
        governor.gone("b")
        await until(servers, lambda: servers.threads["a"] == 2)
        assert governor.threads("b") is None
        governor.busy("b", True)  # a late report for a server that is gone: ignored
        await asyncio.sleep(0.05)  # nothing to wait for: a bug would count b busy here
        assert governor.share.busy == ("a",)
    finally:
        await governor.stop()
