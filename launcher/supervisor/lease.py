"""A lease: one slot on one model server, and all a request needs to use it.

The proxy gets a lease from one router (`launcher.proxy.router`): from the supervisor for a
model served here, from the peer table for a model a peer serves; both look the same.
Releasing it (leaving the `async with`) is the only other contact.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import psutil

from launcher.config.request_params import RequestRules
from launcher.supervisor.process import Endpoint
from launcher.supervisor.state import EndpointGone

# a server that died is noticed by the supervisor within milliseconds: a retry waits that long
# (at most) for the dead endpoint to be withdrawn before it leases again
REPLACED_TIMEOUT = 2.0
_ALIVE_FOR = 0.1  # a process still running this long after it dropped a connection lives


class Lease(Protocol):
    """A granted slot on one server, held for one exchange."""

    @property
    def endpoint(self) -> Endpoint: ...

    @property
    def assembles(self) -> bool:
        """Whether a non-streamed generation is asked as a stream and put back together
        (proxy/assemble.py): llama-server models served here; others get it as it came."""
        ...

    @property
    def tls(self) -> ssl.SSLContext | None: ...

    @property
    def via_peer(self) -> bool:
        """Sent to another lalo (which must not send it on)."""
        ...

    @property
    def request_rules(self) -> RequestRules | None:
        """lalo.yaml's defaults / set / limits / strip for the request (a peer applies its own)."""
        ...

    def record_tokens(self, tokens: int, seconds: float) -> None:
        """The answer generated `tokens` in `seconds` (the model's speed, its counters)."""
        ...

    def unreachable(self, error: BaseException, *, at_once: bool) -> None:
        """The server could not be reached or broke off (a peer fails over)."""
        ...

    async def replaced(self) -> str | None:
        """Returns once a new lease would not get this broken server again (bounded), with
        why the server went when that is known (killed for memory, say), for the client."""
        ...


class LeaseRequest(Protocol):
    """`async with router.lease(name) as lease:` waits for a slot; leaving releases it."""

    async def __aenter__(self) -> Lease: ...

    async def __aexit__(self, *exc: object) -> None: ...

    def waiting_for(self) -> str:
        """What the wait is for now ("queued for", "loading"), for keep-alive notices."""
        ...


@dataclass(frozen=True)
class LocalLease:
    """A slot on a server this lalo runs."""

    endpoint: Endpoint
    assembles: bool
    gone: EndpointGone  # set by the server's owner the moment this endpoint is withdrawn
    on_tokens: Callable[[int, float], None]
    tls: ssl.SSLContext | None = None
    via_peer: bool = False
    request_rules: RequestRules | None = None

    def record_tokens(self, tokens: int, seconds: float) -> None:
        self.on_tokens(tokens, seconds)

    def unreachable(self, error: BaseException, *, at_once: bool) -> None:
        """The supervisor watches its own servers: nothing to do here."""

    async def replaced(self) -> str | None:
        """A server whose process is still there a moment later only dropped that connection:
        it is asked again at once. A killed process closes its sockets a moment before its
        exit is seen: then wait (briefly) for the supervisor to withdraw it, and say why."""
        if not await _within(self.gone, _ALIVE_FOR) and not _running(self.endpoint.pid):
            await _within(self.gone, REPLACED_TIMEOUT - _ALIVE_FOR)
        return self.gone.reason


async def _within(event: asyncio.Event, limit: float) -> bool:
    try:
        async with asyncio.timeout(limit):
            await event.wait()
    except TimeoutError:
        return False
    return True


def _running(pid: int) -> bool:
    """Whether that process exists and has not exited (a zombie waiting to be reaped has)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
