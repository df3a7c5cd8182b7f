"""Prometheus gauges of the peers (launcher.proxy.peers), read from the PeerTable when scraped."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from launcher.proxy.peers import PeerTable


class PeerCollector(Collector):
    """`lalo_peer_up`, `lalo_peer_models`, `lalo_peer_check_failures`, `lalo_peer_requests`."""

    def __init__(self, peers: PeerTable) -> None:
        self._peers = peers

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily("lalo_peer_up", "1 when the peer answers its health checks",
                               labels=["peer", "state"])
        models = GaugeMetricFamily("lalo_peer_models", "Models the peer offers",
                                   labels=["peer"])
        failures = GaugeMetricFamily("lalo_peer_check_failures",
                                     "Failed health checks in a row", labels=["peer"])
        requests = CounterMetricFamily("lalo_peer_requests", "Requests sent to the peer",
                                       labels=["peer"])
        for peer in self._peers.peers.values():
            up.add_metric([peer.name, peer.state], 1.0 if peer.state == "up" else 0.0)
            models.add_metric([peer.name], float(len(peer.models)))
            failures.add_metric([peer.name], float(peer.failures))
            requests.add_metric([peer.name], float(peer.requests))
        yield from (up, models, failures, requests)
