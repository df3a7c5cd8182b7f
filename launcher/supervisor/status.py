"""What the supervisor reports of each model: the immutable snapshot the proxy reads, and
the row of `/api/status` (`lalo status`, the dashboard)."""

from __future__ import annotations

import time
from typing import Any

from launcher.supervisor.records import ModelRecord
from launcher.supervisor.snapshot import ModelSnapshot


def snapshot_of(record: ModelRecord, required: int, threads: int | None = None) -> ModelSnapshot:
    """`record` as it is now (`required`: what admission counts it for; `threads`: what the
    governor set on its server)."""
    meta, model, waits = record.meta, record.model, record.waits
    return ModelSnapshot(
        name=meta.name, aliases=meta.aliases, engine=meta.engine, path=meta.path,
        log_path=model.log.path, ttl=record.ttl, estimate=meta.estimate,
        required=required, ctx_size=model.settings.ctx_size,
        state=str(model.reported_state), lifecycle=str(model.state),
        endpoint=model.endpoint, rss=model.rss, in_flight=record.in_flight,
        queued=len(record.queue),
        idle_since=max(record.last_used, model.started_at or 0.0),
        requests=record.requests, completion_tokens=record.completion_tokens,
        loads=record.loads, evictions=record.evictions, restarts=record.restarts,
        swaps_idle=record.swaps["idle"], swaps_max_wait=record.swaps["max_wait"],
        wait_buckets=tuple(waits.buckets), wait_count=waits.count, wait_total=waits.total,
        threads=threads if threads is not None else record.model.settings.threads,
        capabilities=meta.capabilities,
    )


def status_row(record: ModelRecord, *, measured: int | None, loading: bool,
               now: float, threads: int | None = None) -> dict[str, Any]:
    """One model's row (`measured`: its highest RSS seen; `now`: the supervisor's clock)."""
    meta = record.meta
    recent = [rate for at, rate in record.token_rates if time.time() - at < 300]
    return {
        "name": meta.name,
        "aliases": list(meta.aliases),
        "engine": meta.engine,
        "file": meta.path,
        "synthetic": meta.synthetic,
        "preload": meta.preload,
        "pinned": meta.pinned,
        "ram_estimate": meta.estimate,
        "ctx_size": meta.ctx_size, "parallel": meta.parallel, "kv_cache": meta.kv_cache,
        "ram_measured": measured,
        "requests": record.requests,
        "in_flight": record.in_flight,
        "queued": sum(1 for w in record.queue if w.slot),
        "waiting_reason": record.waiting_reason,
        "loading": loading,
        # how long the load under way has taken, against the last one (load_seconds)
        "loading_s": round(now - record.load_began, 1)
        if record.load_began is not None else None,
        "draining": record.draining,
        "completion_tokens": record.completion_tokens,
        "tokens_per_s": round(recent[-1], 1) if recent else None,
        "tokens_per_s_history": [round(rate, 1) for rate in recent[-30:]],
        **record.model.snapshot(),
        "restarts": record.restarts,
        "failures": record.policy.failures,
        "max_failures": record.policy.max_failures,
        "restart_in_s": round(max(0.0, record.restart_at - now), 1)
        if record.restart_at is not None else None,
        "loads": record.loads,
        "wakes": record.wakes,
        "evictions": record.evictions,
        # compute threads: set by the governor from what is busy, or fixed at start (None:
        # the engine's default)
        "threads": threads if threads is not None else record.model.settings.threads,
        "thread_policy": "governed" if meta.governed else "static",
    }
