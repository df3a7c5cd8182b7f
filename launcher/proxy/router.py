"""Where a request for a model goes: a server this lalo runs or a peer, behind one interface.

The forwarder asks `lease(name)` and gets a `LeaseRequest`; the lease it yields carries the
endpoint and all else the exchange needs (`launcher.supervisor.lease`).
"""

from __future__ import annotations

from launcher.proxy.peers import PeerTable
from launcher.supervisor.lease import LeaseRequest
from launcher.supervisor.supervisor import Supervisor


class Router:
    """Names to leases, over the supervisor's models and the peers' (if any)."""

    def __init__(self, supervisor: Supervisor, peers: PeerTable | None = None) -> None:
        self.supervisor = supervisor
        self.peers = peers

    def resolve(self, requested: str, *, from_peer: bool = False) -> str | None:
        """The model a request names (a name or alias served here, or a model a peer offers,
        unless the request came from a peer: never sent on), or None."""
        name = self.supervisor.names.get(requested)
        if (name is None and self.peers is not None and not from_peer
                and self.peers.offers(requested)):
            return requested
        return name

    def refusal(self, name: str, route: str) -> str | None:
        """Why model `name` cannot serve a request on `route` (a `launcher.proxy.routes` label):
        a message naming the lalo setting, for a 400 before anything loads; None when it can,
        or when it is a peer's (the peer decides). One lookup: this is the hot path."""
        capabilities = self.supervisor.capabilities.get(name)
        return capabilities.refusal(route, name) if capabilities is not None else None

    def lease(self, name: str) -> LeaseRequest:
        """A slot for one request to `name`: on a peer when one serves it instead
        (`launcher.proxy.peers.choose_route`), else here. PeerDownError when only down peers
        offer it."""
        if self.peers is not None:
            remote = self.peers.lease_request(name, local=name in self.supervisor.names)
            if remote is not None:
                return remote
        return self.supervisor.lease(name)

    def known(self, *, peers: bool = True) -> str:
        """Every name a request may give, for the message of an unknown one; `peers=False`:
        only the models served here (the admin routes, the `/upstream` pass-through)."""
        names = list(self.supervisor.names)
        if peers and self.peers is not None:
            names += self.peers.model_names()
        return ", ".join(dict.fromkeys(names)) or "(none configured)"
