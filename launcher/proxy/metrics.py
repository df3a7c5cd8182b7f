"""Prometheus metrics: per-request counters and histograms, supervisor gauges and per-key
counters read at scrape time, and (optionally) the model servers' own metrics merged in."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from launcher.proxy.activity import Activity
from launcher.proxy.metrics_merge import MergedMetrics
from launcher.supervisor.supervisor import WAIT_BUCKETS, Supervisor

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _SupervisorCollector(Collector):
    """Gauges that already live in the supervisor: read them when scraped, never per request."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        sup = self._supervisor
        in_flight = GaugeMetricFamily("lalo_requests_in_flight", "Requests being served", labels=["model"])
        queued = GaugeMetricFamily("lalo_queue_depth", "Requests waiting for a slot or a load",
                                   labels=["model"])
        ready = GaugeMetricFamily("lalo_model_ready", "1 when the model's server is ready",
                                  labels=["model", "state"])
        rss = GaugeMetricFamily("lalo_model_rss_bytes", "Resident memory of the model's server",
                                labels=["model"])
        estimate = GaugeMetricFamily("lalo_model_ram_estimate_bytes", "Memory lalo estimated",
                                     labels=["model"])
        threads = GaugeMetricFamily(
            "lalo_model_threads", "Compute threads of the model's server: set from what is busy "
            "(lalo's engine, threads: auto) or as started", labels=["model"])
        loads = CounterMetricFamily("lalo_model_loads", "Loads started by lalo", labels=["model"])
        evictions = CounterMetricFamily("lalo_model_evictions", "Unloads to make room",
                                        labels=["model"])
        restarts = CounterMetricFamily("lalo_model_restarts", "Automatic restarts after a crash",
                                       labels=["model"])
        tokens = CounterMetricFamily("lalo_completion_tokens", "Tokens generated",
                                     labels=["model"])
        swaps = CounterMetricFamily(
            "lalo_swaps", "Models unloaded to make room for another, by cause (idle: it was "
            "idle; max_wait: a request for another model had waited resources.max_wait)",
            labels=["model", "cause"])
        waits = HistogramMetricFamily(
            "lalo_queue_wait_seconds", "Time a request waited for its model (slot, load, "
            "restart, other models' batches)", labels=["model"])
        for name, model in sup.snapshot().items():
            in_flight.add_metric([name], model.in_flight)
            queued.add_metric([name], model.queued)
            state = model.state  # "sleeping" shows as such
            ready.add_metric([name, state], 1.0 if state == "ready" else 0.0)
            rss.add_metric([name], float(model.rss or 0))
            estimate.add_metric([name], float(model.estimate))
            if model.threads is not None:
                threads.add_metric([name], float(model.threads))
            loads.add_metric([name], model.loads)
            evictions.add_metric([name], model.evictions)
            restarts.add_metric([name], model.restarts)
            tokens.add_metric([name], model.completion_tokens)
            swaps.add_metric([name, "idle"], model.swaps_idle)
            swaps.add_metric([name, "max_wait"], model.swaps_max_wait)
            cumulative, buckets = 0, []
            for bound, count in zip(WAIT_BUCKETS, model.wait_buckets, strict=True):
                cumulative += count
                buckets.append((str(float(bound)), cumulative))
            buckets.append(("+Inf", model.wait_count))
            waits.add_metric([name], buckets, sum_value=model.wait_total)
        budget = GaugeMetricFamily("lalo_ram_budget_bytes", "RAM budget for model servers")
        budget.add_metric([], float(sup.budget().bytes))
        yield from (in_flight, queued, ready, rss, estimate, threads, loads, evictions, restarts,
                    tokens, swaps, waits, budget)


class _KeyCollector(Collector):
    """Requests and tokens per API key, by the key's name (never the key itself)."""

    def __init__(self, activity: Activity) -> None:
        self._activity = activity

    def collect(self) -> Iterator[CounterMetricFamily]:
        requests = CounterMetricFamily("lalo_key_requests", "Requests answered, by API key name",
                                       labels=["key"])
        tokens = CounterMetricFamily("lalo_key_tokens", "Tokens by API key name and kind "
                                     "(prompt, completion)", labels=["key", "kind"])
        for name, (count, prompt, completion) in self._activity.by_key.items():
            requests.add_metric([name], count)
            tokens.add_metric([name, "prompt"], prompt)
            tokens.add_metric([name, "completion"], completion)
        yield requests
        yield tokens


class ProxyMetrics:
    """Owns a private registry (several apps can live in one process, e.g. in tests)."""

    def __init__(self, supervisor: Supervisor, activity: Activity | None = None,
                 merged: MergedMetrics | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lalo_requests", "Requests answered, by model, route and status",
            ["model", "route", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "lalo_request_seconds", "Time from request to the last byte of the answer",
            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.ttft = Histogram(
            "lalo_time_to_first_token_seconds", "Time from request to the first streamed byte",
            ["model"], buckets=_TTFT_BUCKETS, registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        self.registry.register(_SupervisorCollector(supervisor))
        if activity is not None:
            self.registry.register(_KeyCollector(activity))
        self.merged = merged

    def render(self) -> bytes:
        """lalo's own metrics, then the model servers' (call `merged.refresh()` first)."""
        own = generate_latest(self.registry)
        return own if self.merged is None else own + self.merged.render().encode()
