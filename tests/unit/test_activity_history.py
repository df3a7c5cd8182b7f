"""The request history (filters, usage parsing, per-key counts, the SQLite copy and its cap),
the chart ring buffer's bounds, percentiles, and following a log file through rotation."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest

from launcher.config import ActivityConfig
from launcher.proxy.activity import Activity, status_matches, usage_of, valid_status_filter
from launcher.proxy.history import Ring, percentile
from launcher.proxy.logstream import LaloLog, follow_file, sse_lines

STREAM_END = json.dumps({
    "choices": [], "usage": {"prompt_tokens": 31, "completion_tokens": 8},
    "timings": {"prompt_n": 31, "predicted_n": 8, "predicted_per_second": 36.5}}).encode()


def test_usage_from_openai_llama_and_anthropic_shapes() -> None:
    assert usage_of(STREAM_END) == (31, 8, 36.5)
    assert usage_of(b'{"timings": {"prompt_n": 5, "predicted_n": 3}}') == (5, 3, None)
    assert usage_of(b'{"usage": {"input_tokens": 4, "output_tokens": 2}}') == (4, 2, None)
    assert usage_of(b"") == (None, None, None)
    assert usage_of(b"[1]") == (None, None, None)
    assert usage_of(b"not json") == (None, None, None)


def test_status_filters() -> None:
    assert status_matches(503, "5xx") and status_matches(503, "error")
    assert status_matches(200, "200") and not status_matches(200, "error")
    assert not status_matches(404, "5xx")
    assert all(valid_status_filter(v) for v in ("200", "2xx", "error", "ERROR", "4XX"))
    assert not any(valid_status_filter(v) for v in ("ok", "2x", "20", "x2x", ""))


async def test_history_is_bounded_newest_first_and_filtered() -> None:
    activity = Activity(ActivityConfig(size=3))
    start = time.perf_counter()
    for index, (model, status) in enumerate([("a", 200), ("b", 200), ("a", 503), ("a", 200)]):
        activity.record(model, "/v1/chat/completions", status, start - index, None,
                        STREAM_END, b'{"secret": 1}')
    assert activity.total == 4 and len(activity.entries) == 3
    rows = activity.query()
    assert [(r["model"], r["status"]) for r in rows] == [("a", 200), ("a", 503), ("b", 200)]
    assert rows[0]["completion_tokens"] == 8 and rows[0]["tokens_per_s"] == 36.5
    assert rows[1]["completion_tokens"] is None  # an error's body is not usage
    assert "request" not in rows[0]  # bodies only with capture_bodies
    assert [r["status"] for r in activity.query(model="a")] == [200, 503]
    assert [r["model"] for r in activity.query(status="5xx")] == ["a"]
    assert len(activity.query(count=1)) == 1
    assert activity.by_key == {"anonymous": [4, 31 * 3, 8 * 3]}
    assert activity.per_model == {"a": 3, "b": 1}


async def test_capture_and_sqlite_copy_with_a_size_cap(tmp_path: Path) -> None:
    store = tmp_path / "activity.sqlite"
    activity = Activity(ActivityConfig(size=10, store=True, store_max_size=1024**2,
                                       capture_bodies=True), store_path=store)
    big = b"x" * 60_000
    for _ in range(60):  # ~3.6 MB of captured bodies into a 1 MiB file
        activity.record("a", "/v1/completions", 200, time.perf_counter(), None, STREAM_END, big)
        activity._flush()
        await asyncio.sleep(0)
    assert activity.query()[0]["request"] == big.decode()
    activity.close()  # waits for the writer thread's batches, then writes the rest
    assert activity._store is not None
    rows = activity._store.rows()
    assert 0 < len(rows) < 60
    assert store.stat().st_size <= 1024**2 + 256 * 1024  # the cap, give or take a batch


def test_ring_keeps_the_newest_capacity_items() -> None:
    ring = Ring(3)
    for t in range(5):
        ring.append({"t": float(t)})
    assert len(ring) == 3
    assert [item["t"] for item in ring.items()] == [2.0, 3.0, 4.0]
    assert [item["t"] for item in ring.items(since=3.0)] == [4.0]
    with pytest.raises(ValueError, match="at least 1"):
        Ring(0)


def test_percentiles() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile(list(reversed(values)), 0.95) == 95.0


async def test_follow_file_through_rotation(tmp_path: Path) -> None:
    log = tmp_path / "m.log"
    log.write_text("one\ntwo\n")
    events = follow_file(log, 1, interval=0.01)
    assert await anext(events) == sse_lines(["two"])
    with log.open("a") as handle:
        handle.write("three\nfour")  # "four" is not a whole line yet
    assert await asyncio.wait_for(anext(events), 5) == sse_lines(["three"])
    log.rename(tmp_path / "m.log.1")
    log.write_text("four-new\n")
    assert await asyncio.wait_for(anext(events), 5) == sse_lines(["four-new"])
    await events.aclose()


async def test_lalo_log_streams_new_records() -> None:
    handler = LaloLog(capacity=5)
    logger = logging.getLogger("launcher.test_stream")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("before")
        events = handler.follow(10)
        assert b"before" in await anext(events)
        logger.warning("after\nsecond line")
        event = await asyncio.wait_for(anext(events), 5)
        assert event.endswith(b"data: second line\n\n") and b"after" in event
        await events.aclose()
    finally:
        logger.removeHandler(handler)


async def test_a_sample_per_model_from_activity_and_token_counters(tmp_path: Path) -> None:
    """One interval: requests/s and p50/p95 from the requests that ended in it, tokens/s
    from the supervisor's counter, per model; a quiet model gets zeros and no latency."""
    from launcher.proxy.history import History
    from launcher.supervisor.events import SupervisorEvents
    from launcher.supervisor.supervisor import SupervisedModel, Supervisor
    from tests.unit.test_managed_model import make

    events = SupervisorEvents()
    models = []
    for name in ("a", "b"):
        managed = make(tmp_path / name, name=name, events=events.for_model(name))
        models.append((SupervisedModel(name=name, aliases=(), engine="fake", estimate=1024**2,
                                       preload=False, ttl=0, path=""), managed))
    supervisor = Supervisor(models, events=events)
    activity = Activity(ActivityConfig(size=100))
    now = [1000.0]
    history = History(supervisor, activity, interval=5.0, span=15.0, clock=lambda: now[0])
    history.start()
    history.stop()  # sampled by hand below
    now[0] = 1010.0
    activity._clock = lambda: now[0]
    for seconds in (0.1, 0.2, 0.3, 0.4, 2.0):
        activity.record("a", "chat", 200, time.perf_counter() - seconds, None, b"")
    supervisor.record_tokens("a", 50, 1.0)
    sample = history.sample()
    assert sample["t"] == 1010.0 and sample["budget"] == supervisor.budget().bytes
    a, b = sample["models"]["a"], sample["models"]["b"]
    assert a["rps"] == 0.5 and a["tps"] == 5.0  # 5 requests, 50 tokens in 10 s
    # each duration also holds the time until record() runs: a loaded machine adds tens of ms
    assert a["p50"] == pytest.approx(0.3, abs=0.09) and a["p95"] == pytest.approx(2.0, abs=0.09)
    assert b == {"rps": 0.0, "tps": 0.0, "p50": None, "p95": None, "rss": 0, "queue": 0}
    for _ in range(5):  # the ring holds span / interval samples
        now[0] += 5
        history.sample()
    assert len(history.ring) == 3
    assert history.ring.items()[-1]["models"]["a"]["rps"] == 0.0
