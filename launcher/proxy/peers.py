"""Peers: other lalo instances, or any OpenAI-compatible server, whose models this lalo serves too.

The PeerTable is the one owner of what lalo knows about its peers: whether each is up (a
health check asks its `/v1/models` every `health_interval`; `max_failures` failed checks in a
row, or a refused connection while forwarding, mark it down; one good check brings it back),
and which models each offers (its list, or `auto`: the models it serves itself, refreshed by
every check). Requests are forwarded by the proxy's own forwarder (`launcher.proxy.forward`),
over TLS for an https peer, with the peer's key and `x-lalo-hop` (a lalo never sends such a
request on: one hop); this module only says where to: `choose_route()` is the rule.

Peer states: `unknown` (not checked yet; tried), `up`, `down` (its models answer 503 with
`Retry-After` until a check succeeds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from launcher.config import Config, PeerConfig, resolve_path
from launcher.errors import ConfigError, PeerDownError
from launcher.supervisor.process import Endpoint

if TYPE_CHECKING:  # httpx is imported when checks start, not on lalo's startup path
    import httpx

log = logging.getLogger(__name__)

PeerState = Literal["unknown", "up", "down"]
OWNED_BY_PREFIX = "peer:"
# on every request lalo forwards to a peer: a lalo serves such a request from its own models
# only, so a request never travels on from peer to peer (or back)
HOP_HEADER = b"x-lalo-hop"


@dataclass(frozen=True)
class PeerView:
    """What the routing rule needs to know about one peer."""

    name: str
    state: PeerState
    models: frozenset[str]


@dataclass(frozen=True)
class Route:
    """Where a request for a model goes: `local`, `peer` (which), `down` (503) or `unknown` (404)."""

    kind: Literal["local", "peer", "down", "unknown"]
    peer: str | None = None
    offered_by: tuple[str, ...] = ()


def choose_route(model: str, local: bool, peers: Sequence[PeerView]) -> Route:
    """The routing rule: a model this lalo serves (`local`) is always served here, whatever its
    state (so that a request never goes back and forth between two lalos); else the first peer
    (in config order) that is up, then one not checked yet; a model only down peers offer is
    `down`."""
    offering = tuple(p.name for p in peers if model in p.models)
    if local:
        return Route("local", offered_by=offering)
    for wanted in ("up", "unknown"):
        for peer in peers:
            if peer.state == wanted and model in peer.models:
                return Route("peer", peer.name, offering)
    if offering:
        return Route("down", offered_by=offering)
    return Route("unknown")


def is_peer_endpoint(endpoint: Endpoint) -> bool:
    """A peer's endpoint (PeerTable.lease makes them with pid 0), not a local server's."""
    return endpoint.pid == 0


def listed_models(payload: Any) -> tuple[str, ...]:
    """The ids of an OpenAI `/v1/models` answer that the server serves itself.

    Entries another lalo marks as its own peers' (`owned_by: peer:NAME`) are left out: taking
    them would let two lalos that name each other send a request back and forth.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise ValueError("not an OpenAI model list (no 'data' list)")
    ids = []
    for entry in payload["data"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise ValueError("a model list entry without an 'id'")
        owner = entry.get("owned_by")
        if isinstance(owner, str) and owner.startswith(OWNED_BY_PREFIX):
            continue
        ids.append(entry["id"])
    return tuple(dict.fromkeys(ids))


@dataclass
class Peer:
    """One peer and what the health checks learnt; changed only by its PeerTable."""

    name: str
    config: PeerConfig
    api_key: str = field(repr=False)  # never in status, logs or errors
    tls: ssl.SSLContext | None = None  # https peers: how their certificate is verified
    state: PeerState = "unknown"
    failures: int = 0
    models: tuple[str, ...] = ()
    last_error: str | None = None
    last_check: float | None = None  # wall time
    latency: float | None = None  # seconds the last good check took
    next_check: float = 0.0  # monotonic
    requests: int = 0

    @property
    def host(self) -> str:
        return urlsplit(self.config.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.config.url).port or (443 if self.tls is not None else 80)

    def view(self) -> PeerView:
        return PeerView(self.name, self.state, frozenset(self.models))


def peer_keys(config: Config, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each peer's key from the environment ('' for a peer without `api_key_env`)."""
    environ = os.environ if environ is None else environ
    keys = {}
    for name, peer in config.peers.items():
        if peer.api_key_env is None:
            keys[name] = ""
            continue
        key = environ.get(peer.api_key_env, "").strip()
        if not key:
            raise ConfigError(f"peers.{name}.api_key_env: ${peer.api_key_env} is not set "
                              "(export the peer's key in that variable before `lalo up`)")
        keys[name] = key
    return keys


def tls_context(peer: PeerConfig, base_dir: Path | None = None) -> ssl.SSLContext | None:
    """How an https peer's certificate is checked: against `tls_ca_file`, else the system's
    trust store; None for an http peer."""
    if not peer.url.startswith("https://"):
        return None
    if peer.tls_ca_file is None:
        return ssl.create_default_context()
    path = resolve_path(peer.tls_ca_file, base_dir or Path.cwd())
    try:
        return ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_ca_file: {path}: not a readable PEM file of certificates "
                          f"({exc})") from exc


class PeerTable:
    """The peers of one lalo, their health task, and where each peer model's requests go."""

    def __init__(
        self,
        peers: Mapping[str, PeerConfig],
        keys: Mapping[str, str],
        *,
        tls: Mapping[str, ssl.SSLContext | None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        tls = tls if tls is not None else {name: tls_context(cfg) for name, cfg in peers.items()}
        self._peers = {
            name: Peer(name, cfg, keys.get(name, ""), tls.get(name),
                       models=() if cfg.models == "auto" else tuple(cfg.models))
            for name, cfg in peers.items()
        }
        self._transport = transport
        self._clock = clock
        self._clients: dict[str, httpx.AsyncClient] = {}  # one per peer: each has its own CA
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_config(cls, config: Config, environ: Mapping[str, str] | None = None, *,
                    base_dir: Path | None = None) -> PeerTable:
        """The table for `config`; ConfigError for a key missing from the environment or an
        unreadable `tls_ca_file` (relative to `base_dir`, the config file's folder)."""
        tls = {}
        for name, cfg in config.peers.items():
            try:
                tls[name] = tls_context(cfg, base_dir)
            except ConfigError as exc:
                raise ConfigError(f"peers.{name}.{exc}") from None
        return cls(config.peers, peer_keys(config, environ), tls=tls)

    def __bool__(self) -> bool:
        return bool(self._peers)

    @property
    def peers(self) -> Mapping[str, Peer]:
        return self._peers

    # --- routing ------------------------------------------------------------------------------
    def views(self) -> list[PeerView]:
        return [peer.view() for peer in self._peers.values()]

    def offers(self, model: str) -> bool:
        return any(model in peer.models for peer in self._peers.values())

    def model_names(self) -> list[str]:
        """Every model some peer offers, in config order."""
        return list(dict.fromkeys(m for peer in self._peers.values() for m in peer.models))

    def route(self, model: str, local: bool) -> Route:
        return choose_route(model, local, self.views())

    def lease(self, model: str, local: bool) -> Endpoint | None:
        """Where to send a request for `model`: a peer's endpoint, or None (serve it locally).

        PeerDownError when only down peers offer it."""
        route = self.route(model, local)
        if route.kind == "down":
            raise PeerDownError(
                f"{model}: served by peer(s) {', '.join(route.offered_by)}, which do not answer "
                "now; retry later", retry_after=self.retry_after(route.offered_by))
        if route.kind != "peer" or route.peer is None:
            return None
        peer = self._peers[route.peer]
        peer.requests += 1
        return Endpoint(base_url=peer.config.url, api_key=peer.api_key, pid=0,
                        host=peer.host, port=peer.port)

    def lease_request(self, model: str, local: bool) -> PeerLease | None:
        """`lease` as a lease (`launcher.supervisor.lease`): a peer's slot, or None (here)."""
        endpoint = self.lease(model, local)
        if endpoint is None:
            return None
        return PeerLease(endpoint, self.tls_for(endpoint), self)

    def tls_for(self, endpoint: Endpoint) -> ssl.SSLContext | None:
        """The TLS context to reach that endpoint with (None: plain HTTP)."""
        if is_peer_endpoint(endpoint):
            for peer in self._peers.values():
                if (peer.host, peer.port) == (endpoint.host, endpoint.port):
                    return peer.tls
        return None

    def retry_after(self, names: Iterable[str]) -> int:
        """Whole seconds until the next check of any of these peers (at least 1)."""
        now = self._clock()
        due = [self._peers[n].next_check - now for n in names if n in self._peers]
        return max(1, math.ceil(min(due))) if due else 1

    def unreachable(self, endpoint: Endpoint, error: BaseException, *,
                    at_once: bool = True) -> str | None:
        """A forward could not reach this endpoint: one failed check, or (`at_once`: nobody
        listens there) down until a check succeeds, so the next request fails over.

        Returns the peer's name, or None when the endpoint is not a peer's (a local server)."""
        for peer in self._peers.values():
            if is_peer_endpoint(endpoint) and (peer.host, peer.port) == (endpoint.host, endpoint.port):
                self._failed(peer, f"forwarding: {error}", at_once=at_once)
                return peer.name
        return None

    # --- health -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start checking every peer (the first check at once)."""
        if self._tasks or not self._peers:
            return
        self._tasks = [asyncio.create_task(self._watch(peer), name=f"peer {peer.name}")
                       for peer in self._peers.values()]

    def _client(self, peer: Peer) -> httpx.AsyncClient:
        client = self._clients.get(peer.name)
        if client is None:
            import httpx

            client = httpx.AsyncClient(transport=self._transport, follow_redirects=False,
                                       verify=peer.tls if peer.tls is not None else True)
            self._clients[peer.name] = client
        return client

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    async def _watch(self, peer: Peer) -> None:
        while True:
            peer.next_check = self._clock() + peer.config.health_interval
            try:
                await self.check(peer.name)
            except Exception:  # a bug must not end the checks: the peer would stay as it was
                log.exception("peer %s: health check", peer.name)
            await asyncio.sleep(max(0.0, peer.next_check - self._clock()))

    async def check(self, name: str) -> PeerState:
        """Ask one peer for its models now; updates its state (and models, for `auto`)."""
        import httpx

        peer = self._peers[name]
        headers = {"authorization": f"Bearer {peer.api_key}"} if peer.api_key else {}
        started = time.perf_counter()
        try:
            answer = await self._client(peer).get(
                peer.config.url + "/v1/models", headers=headers,
                timeout=peer.config.health_timeout)
            if answer.status_code != 200:
                hint = " (check its api_key_env)" if answer.status_code in (401, 403) else ""
                raise ValueError(f"/v1/models answered {answer.status_code}{hint}")
            listed = listed_models(answer.json())
        except (httpx.HTTPError, ValueError) as exc:
            self._failed(peer, _describe(exc))
            return peer.state
        peer.last_check = time.time()
        peer.latency = time.perf_counter() - started
        peer.failures = 0
        peer.last_error = None
        if peer.config.models == "auto":
            peer.models = listed
        else:
            missing = [m for m in peer.config.models if m not in listed]
            if missing:
                peer.last_error = f"does not list {', '.join(missing)}"
        self._set_state(peer, "up")
        return peer.state

    def _failed(self, peer: Peer, error: str, *, at_once: bool = False) -> None:
        peer.last_check = time.time()
        peer.last_error = error
        peer.failures = max(peer.failures + 1, peer.config.max_failures if at_once else 0)
        if peer.failures >= peer.config.max_failures:
            self._set_state(peer, "down")
        log.info("peer %s: check failed (%d in a row): %s", peer.name, peer.failures, error)

    def _set_state(self, peer: Peer, state: PeerState) -> None:
        if peer.state != state:
            log.log(logging.WARNING if state == "down" else logging.INFO, "peer %s: %s -> %s%s",
                    peer.name, peer.state, state,
                    f" ({peer.last_error})" if state == "down" and peer.last_error else "")
            peer.state = state

    # --- reporting ----------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """Each peer for /api/status and the dashboard (never its key)."""
        return [{
            "name": peer.name,
            "url": peer.config.url,
            "state": peer.state,
            "models": list(peer.models),
            "models_from": "auto" if peer.config.models == "auto" else "list",
            "failures": peer.failures,
            "last_error": peer.last_error,
            "last_check": peer.last_check,
            "latency_ms": None if peer.latency is None else round(peer.latency * 1000, 1),
            "requests": peer.requests,
        } for peer in self._peers.values()]

    def model_entries(self, local: Callable[[str], bool], created: int) -> list[dict[str, Any]]:
        """`/v1/models` entries for the models only peers serve (local ones are listed already)."""
        entries = []
        for model in self.model_names():
            if local(model):
                continue
            route = self.route(model, False)
            owner = route.peer or route.offered_by[0]
            entries.append({
                "id": model, "object": "model", "created": created,
                "owned_by": OWNED_BY_PREFIX + owner,
                "state": "ready" if route.kind == "peer" else "unavailable",
                "lalo": {"remote": True, "peer": owner, "peers": list(route.offered_by),
                         "peer_state": self._peers[owner].state},
            })
        return entries


def _describe(exc: BaseException) -> str:
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__})"
    text = str(exc) or type(exc).__name__
    return text[:300]


class PeerLease:
    """A request sent to a peer: granted at once (the peer queues it), released with nothing
    to hand back; a peer that cannot be reached is marked so the next request fails over."""

    __slots__ = ("_table", "endpoint", "tls")
    assembles = False  # the peer decides that for its own servers
    via_peer = True
    request_rules = None  # the peer's own lalo applies its rules

    def __init__(self, endpoint: Endpoint, tls: ssl.SSLContext | None, table: PeerTable) -> None:
        self.endpoint = endpoint
        self.tls = tls
        self._table = table

    async def __aenter__(self) -> PeerLease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def waiting_for(self) -> str:
        return "waiting for"

    def record_tokens(self, tokens: int, seconds: float) -> None:
        """Counted by the peer that generated them."""

    def unreachable(self, error: BaseException, *, at_once: bool) -> None:
        self._table.unreachable(self.endpoint, error, at_once=at_once)

    async def replaced(self) -> None:
        """The next lease fails over (or finds the peer again) at once."""
