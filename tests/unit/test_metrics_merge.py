"""Merging the model servers' /metrics: llama-server's names kept, a `model` label added,
one HELP/TYPE per family, scrapes cached, a server that fails named, all through real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from launcher.proxy.metrics_merge import MergedMetrics, merge, relabel
from launcher.proxy.upstream import UpstreamPool
from launcher.supervisor.process import Endpoint

# captured from the real llama-server (0c1e570) with --metrics after one chat request
REAL = (Path(__file__).parent / "data" / "llama_server_metrics.txt").read_text()


def test_names_kept_and_model_label_added() -> None:
    text = merge([relabel(REAL, "smol"), relabel(REAL, "gemma")])
    original = {line.split()[0] for line in REAL.splitlines() if not line.startswith("#")}
    merged_names = {line.split("{")[0] for line in text.splitlines() if not line.startswith("#")}
    assert merged_names == original
    assert 'llamacpp:prompt_tokens_total{model="smol"} 31' in text
    assert 'llamacpp:prompt_tokens_total{model="gemma"} 31' in text
    assert text.count("# TYPE llamacpp:prompt_tokens_total counter") == 1
    # a counter without _total keeps its name (prometheus_client would have renamed it)
    assert 'llamacpp:n_tokens_max{model="smol"} 38' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = families["llamacpp:predicted_tokens_seconds"].samples
    assert {s.labels["model"] for s in samples} == {"smol", "gemma"}


def test_existing_labels_stay_after_model() -> None:
    text = ('# TYPE x_seconds histogram\nx_seconds_bucket{le="0.5"} 3\nx_seconds_bucket{le="+Inf"} 4\n'
            'x_seconds_sum 1.5\nx_seconds_count 4\n')
    merged = merge([relabel(text, 'we"ird')])
    assert 'x_seconds_bucket{model="we\\"ird",le="0.5"} 3' in merged
    assert 'x_seconds_count{model="we\\"ird"} 4' in merged
    family = next(iter(text_string_to_metric_families(merged)))
    assert family.type == "histogram" and len(family.samples) == 4


@contextlib.asynccontextmanager
async def metrics_server(body: bytes, status: int = 200) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A real HTTP server answering /metrics (a double: a llama-server we can count hits on)."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            seen.append(head)
            writer.write(b"HTTP/1.1 %d X\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n"
                         % (status, len(body)) + body)
            await writer.drain()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(
        lambda r, w: handle(r, w), sock=sock)
    try:
        yield sock.getsockname()[1], seen
    finally:
        server.close()


async def test_scrapes_are_cached_and_failures_named() -> None:
    now = [0.0]
    pool = UpstreamPool()
    async with metrics_server(REAL.encode()) as (port, seen), \
            metrics_server(b"nope", status=500) as (bad_port, _):
        endpoints = {"smol": Endpoint(f"http://127.0.0.1:{port}", "k1", 1, port=port),
                     "broken": Endpoint(f"http://127.0.0.1:{bad_port}", "k2", 2, port=bad_port)}
        merged = MergedMetrics(lambda: endpoints, pool, max_age=2.0, clock=lambda: now[0])
        await asyncio.gather(merged.refresh(), merged.refresh())  # one scrape shared
        assert len(seen) == 1
        assert b"authorization: Bearer k1" in seen[0]
        now[0] = 1.9
        await merged.refresh()
        assert len(seen) == 1 and merged.scrapes == 1
        now[0] = 2.1
        await merged.refresh()
        assert len(seen) == 2
        text = merged.render()
        assert 'llamacpp:tokens_predicted_total{model="smol"} 8' in text
        assert 'lalo_upstream_scrape_failed{model="broken"} 1' in text
        assert "broken" not in text.split("lalo_upstream_scrape_seconds")[0]
        list(text_string_to_metric_families(text))  # valid exposition
    await pool.aclose()


async def test_no_ready_server_renders_only_lalos_lines() -> None:
    pool = UpstreamPool()
    merged = MergedMetrics(lambda: {}, pool)
    await merged.refresh()
    assert merged.render().startswith("# HELP lalo_upstream_scrape_seconds")
    await pool.aclose()
