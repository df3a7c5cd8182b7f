"""Every ready model server's own `/metrics`, re-exported by lalo with a `model` label.

llama-server's names (`llamacpp:prompt_tokens_total`, `llamacpp:kv_cache_usage_ratio`, ...)
are kept as they are, so one Prometheus target covers lalo and all its servers. Scrapes go
out to all ready servers at once with each server's per-start key, and are cached for
`max_age` seconds: a Prometheus scraping every few seconds does not hit every server each time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from launcher.proxy.upstream import UpstreamError, UpstreamPool
from launcher.supervisor.process import Endpoint

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE = 2.0  # seconds a scrape is reused
SCRAPE_TIMEOUT = 2.0  # seconds a model server has to answer


def relabel(text: str, model: str) -> list[Metric]:
    """The families in one server's exposition, each sample with `model` added first."""
    families = []
    for family in text_string_to_metric_families(text):
        relabelled = Metric(family.name, family.documentation, family.type, family.unit)
        relabelled.samples = [
            Sample(s.name, {"model": model, **s.labels}, s.value, s.timestamp, s.exemplar)
            for s in family.samples
        ]
        families.append(relabelled)
    return families


@dataclass
class _Scrape:
    at: float = -1e9
    families: list[Metric] = field(default_factory=list)
    seconds: float = 0.0  # what the last scrape of all servers took
    errors: dict[str, str] = field(default_factory=dict)


class MergedMetrics(Collector):
    """A prometheus_client collector over the last scrape; call `refresh()` before rendering."""

    def __init__(self, endpoints: Callable[[], dict[str, Endpoint]], pool: UpstreamPool, *,
                 max_age: float = DEFAULT_MAX_AGE, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._endpoints = endpoints
        self._pool = pool
        self.max_age = max_age
        self._clock = clock
        self._last = _Scrape()
        self._running: asyncio.Future[None] | None = None
        self.scrapes = 0

    async def refresh(self) -> None:
        """Scrape all ready servers unless the last scrape is younger than `max_age`;
        concurrent callers share one scrape."""
        if self._clock() - self._last.at < self.max_age:
            return
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._scrape_all())
        await asyncio.shield(self._running)

    async def _scrape_all(self) -> None:
        started = time.perf_counter()
        endpoints = self._endpoints()
        results = await asyncio.gather(
            *(self._scrape(name, endpoint) for name, endpoint in endpoints.items()),
            return_exceptions=True)
        families: list[Metric] = []
        errors: dict[str, str] = {}
        for name, result in zip(endpoints, results, strict=True):
            if isinstance(result, BaseException):
                errors[name] = f"{type(result).__name__}: {result}"
            else:
                families.extend(result)
        self.scrapes += 1
        self._last = _Scrape(self._clock(), _merge(families), time.perf_counter() - started,
                             errors)

    async def _scrape(self, name: str, endpoint: Endpoint) -> list[Metric]:
        headers = [(b"authorization", f"Bearer {endpoint.api_key}".encode())]
        response = await self._pool.request("GET", endpoint.host, endpoint.port, "/metrics",
                                            headers, b"", SCRAPE_TIMEOUT)
        try:
            body = await response.read()
        finally:
            await response.aclose()
        if response.status_code != 200:
            raise UpstreamError(f"/metrics answered {response.status_code}")
        return relabel(body.decode("utf-8", errors="replace"), name)

    def collect(self) -> Iterator[Metric]:
        yield from self._last.families
        seconds = Metric("lalo_upstream_scrape_seconds",
                         "What the last scrape of all model servers' /metrics took", "gauge")
        seconds.add_sample("lalo_upstream_scrape_seconds", {}, self._last.seconds)
        failed = Metric("lalo_upstream_scrape_failed",
                        "1 for a ready model server whose /metrics could not be read", "gauge")
        for name in self._last.errors:
            failed.add_sample("lalo_upstream_scrape_failed", {"model": name}, 1.0)
        yield seconds
        yield failed


def _merge(families: list[Metric]) -> list[Metric]:
    """One family per name (servers each send their own HELP/TYPE), samples of all models."""
    merged: dict[str, Metric] = {}
    for family in families:
        known = merged.get(family.name)
        if known is None:
            merged[family.name] = family
        else:
            known.samples.extend(family.samples)
    return list(merged.values())
