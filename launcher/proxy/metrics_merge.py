"""Every ready model server's own `/metrics`, re-exported by lalo with a `model` label.

llama-server's names (`llamacpp:prompt_tokens_total`, `llamacpp:kv_cache_usage_ratio`, ...)
are kept as they are, so one Prometheus target covers lalo and all its servers. Scrapes go
out to all ready servers at once with each server's per-start key, and are cached for
`max_age` seconds: a Prometheus scraping every few seconds does not hit every server each time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from launcher.proxy.upstream import UpstreamError, UpstreamPool
from launcher.supervisor.process import Endpoint

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE = 2.0  # seconds a scrape is reused
SCRAPE_TIMEOUT = 2.0  # seconds a model server has to answer
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?(\s.*)$")


@dataclass
class Family:
    """One metric's `# HELP` / `# TYPE` lines, as the server wrote them, and its samples."""

    name: str
    header: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


def relabel(text: str, model: str) -> dict[str, Family]:
    """The families of one server's text exposition, each sample with `model="NAME"` first.

    Names, types and values stay exactly as the server wrote them (the text is not re-encoded:
    prometheus_client would rename a counter that lacks `_total`, as llama-server's
    `llamacpp:n_tokens_max` does).
    """
    families: dict[str, Family] = {}
    current: Family | None = None
    label = f'model="{_escape(model)}"'
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                current = families.get(name) or families.setdefault(name, Family(name))
                current.header.append(line)
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, rest = match.groups()
        if current is None or not name.startswith(current.name):
            current = families.setdefault(name, Family(name))
        inner = labels[1:-1].strip() if labels else ""
        current.samples.append(f"{name}{{{label}{',' + inner if inner else ''}}}{rest}")
    return families


def merge(scrapes: list[dict[str, Family]]) -> str:
    """One exposition: each family's header once, then the samples of every model."""
    merged: dict[str, Family] = {}
    for families in scrapes:
        for name, family in families.items():
            known = merged.get(name)
            if known is None:
                merged[name] = Family(name, list(family.header), list(family.samples))
            else:
                known.samples.extend(family.samples)
    lines: list[str] = []
    for family in merged.values():
        lines.extend(family.header)
        lines.extend(family.samples)
    return "\n".join(lines) + "\n" if lines else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class _Scrape:
    at: float = -1e9
    text: str = ""
    seconds: float = 0.0  # what the last scrape of all servers took
    errors: dict[str, str] = field(default_factory=dict)


class MergedMetrics:
    """The model servers' metrics as one text exposition, refreshed at most every `max_age`."""

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
        scrapes: list[dict[str, Family]] = []
        errors: dict[str, str] = {}
        for name, result in zip(endpoints, results, strict=True):
            if isinstance(result, BaseException):
                errors[name] = f"{type(result).__name__}: {result}"
                log.debug("%s: /metrics not read: %s", name, errors[name])
            else:
                scrapes.append(result)
        self.scrapes += 1
        self._last = _Scrape(self._clock(), merge(scrapes), time.perf_counter() - started,
                             errors)

    async def _scrape(self, name: str, endpoint: Endpoint) -> dict[str, Family]:
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

    def render(self) -> str:
        """The last scrape, and what it cost and which servers did not answer."""
        scrape = self._last
        lines = [
            "# HELP lalo_upstream_scrape_seconds What the last scrape of all model servers' "
            "/metrics took",
            "# TYPE lalo_upstream_scrape_seconds gauge",
            f"lalo_upstream_scrape_seconds {scrape.seconds:.6f}",
            "# HELP lalo_upstream_scrape_failed 1 for a ready model server whose /metrics "
            "could not be read",
            "# TYPE lalo_upstream_scrape_failed gauge",
            *(f'lalo_upstream_scrape_failed{{model="{_escape(name)}"}} 1'
              for name in scrape.errors),
        ]
        return scrape.text + "\n".join(lines) + "\n"
