"""`lalo doctor --bench`: the decode speed each catalog model will get on this machine, measured
on a random-weight model of the same shape and quantization (nothing is downloaded).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from launcher import paths
from launcher.engines.base import ServerSettings
from launcher.engines.llama_server import LlamaServerEngine
from launcher.engines.registry import FoundEngine, find_tool
from launcher.errors import EngineError, LaloError, ModelError
from launcher.models.catalog_entry import CatalogEntry
from launcher.models.synthetic import WRITABLE_TYPES, shape_named, write_synthetic_model
from launcher.supervisor.logs import ModelLog
from launcher.supervisor.process import ManagedModel, Timeouts
from launcher.units import format_size

BENCH_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
LOAD_TIMEOUT = 300.0
REQUEST_TIMEOUT = 300.0


@dataclass(frozen=True)
class BenchResult:
    """Decode speed of one catalog model's shape and quantization on this machine."""

    model_id: str
    shape: str | None
    file_type: str
    threads: int
    tokens: int = 0
    decode_tok_s: float | None = None  # measured by lalo from streamed tokens
    server_decode_tok_s: float | None = None  # llama-server's own timing of the same request
    prompt_tok_s: float | None = None
    load_seconds: float | None = None
    # Other programs' CPU use just before the measurement, in cores (1-minute load average
    # where the OS has one); a busy machine decodes slower than the client's idle one will.
    busy_cores: float | None = None
    runs: tuple[float, ...] = ()  # decode tok/s of every measured run; the best is reported
    model_path: str | None = None
    synthetic_size: int | None = None
    real_size: int | None = None
    # Decode is bound by bytes read per token: the measured speed scaled by synthetic/real
    # file size, where the real file's quantizer kept more (or fewer) bytes than ours.
    expected_tok_s: float | None = None
    error: str | None = None
    synthetic: bool = field(default=True)


def bench_model_path(entry: CatalogEntry, directory: Path | None = None) -> Path:
    base = directory if directory is not None else paths.synthetic_dir()
    return base / f"bench-{entry.bench_shape}-{entry.file_type.lower()}.gguf"


def prepare_bench_model(
    entry: CatalogEntry,
    quantize: Path | None,
    *,
    directory: Path | None = None,
    note: Callable[[str], None] = lambda _: None,
) -> Path:
    """A random-weight GGUF of the entry's shape and file type, made once and cached."""
    if entry.bench_shape is None:
        raise LaloError(f"{entry.id}: the catalog names no bench_shape")
    target = bench_model_path(entry, directory)
    if target.is_file():
        return target
    shape = shape_named(entry.bench_shape)
    name = f"lalo bench {entry.bench_shape} {entry.file_type} (random weights)"
    if entry.file_type in WRITABLE_TYPES:
        note(f"{entry.id}: writing a {entry.file_type} random-weight {entry.bench_shape} model")
        return write_synthetic_model(target, shape, tensor_type=entry.file_type, name=name)
    if quantize is None:
        raise EngineError(f"{entry.id}: {entry.file_type} needs llama-quantize beside llama-server")
    f16 = target.with_name(f".{target.stem}.f16.tmp.gguf")
    partial = target.with_name(f".{target.stem}.partial.gguf")
    try:
        note(f"{entry.id}: writing an F16 random-weight model of shape {entry.bench_shape}")
        write_synthetic_model(f16, shape, tensor_type="F16", name=name)
        note(f"{entry.id}: quantizing it to {entry.file_type} with llama-quantize")
        done = subprocess.run(
            [str(quantize), str(f16), str(partial), entry.file_type],
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise EngineError(f"{entry.id}: llama-quantize failed ({done.returncode}): {tail}")
        os.replace(partial, target)
    finally:
        f16.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return target


async def measure_decode(
    server: Path,
    model: Path,
    *,
    tokens: int = 64,
    threads: int | None = None,
    ctx_size: int = 1024,
    repeats: int = 3,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Start llama-server on `model` (as the supervisor does), warm up, stream `tokens` tokens
    `repeats` times, stop it.

    Returns the fastest run's decode_tok_s (first to last streamed token),
    server_decode_tok_s and prompt_tok_s (the fastest is the one other programs disturbed
    least), every run's decode speed as `runs`, and load_seconds; LaloError with the
    server's last log lines if it fails.
    """
    threads = threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    settings = ServerSettings(model_path=model, host="127.0.0.1", port=0, api_key="",
                              ctx_size=ctx_size, parallel=1, threads=threads)
    log = ModelLog(log_path or model.with_suffix(".bench.log"))
    managed = ManagedModel(model.stem, LlamaServerEngine(server), settings, log,
                           timeouts=Timeouts(load_timeout=LOAD_TIMEOUT))
    try:
        endpoint = await managed.ensure_ready()
        # A new connection per request: llama-server may close a kept-alive connection just
        # as the next request goes out on it (seen once in CI: "Server disconnected without
        # sending a response"). Connecting costs well under a millisecond, outside the timing.
        async with httpx.AsyncClient(
            base_url=endpoint.base_url, timeout=REQUEST_TIMEOUT, trust_env=False,
            headers={"Authorization": f"Bearer {endpoint.api_key}"},
            limits=httpx.Limits(max_keepalive_connections=0),
        ) as http:
            await _stream_completion(http, 8)  # warm-up: caches, page-ins, first allocation
            runs = [await _stream_completion(http, tokens) for _ in range(max(1, repeats))]
    except ModelError as exc:
        raise LaloError(str(exc)) from exc
    except httpx.HTTPError as exc:
        raise LaloError(f"llama-server stopped answering ({type(exc).__name__}: {exc})") from exc
    finally:
        await managed.close()
    best = max(runs, key=lambda run: run["decode_tok_s"])
    return {**best, "runs": [round(run["decode_tok_s"], 1) for run in runs],
            "load_seconds": managed.load_seconds or 0.0}


async def _stream_completion(http: httpx.AsyncClient, tokens: int) -> dict[str, float]:
    body = {
        "prompt": BENCH_PROMPT,
        "n_predict": tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.0,
        "cache_prompt": False,
    }
    arrivals: list[float] = []
    timings: dict[str, Any] = {}
    async with http.stream("POST", "/completion", json=body) as response:
        if response.status_code != 200:
            raise LaloError(f"llama-server answered {response.status_code} to /completion")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if event.get("content") or event.get("tokens"):
                arrivals.append(time.monotonic())
            if event.get("stop"):
                timings = event.get("timings") or {}
    if len(arrivals) < 2:
        raise LaloError(f"llama-server streamed {len(arrivals)} tokens, expected {tokens}")
    return {
        "tokens": float(len(arrivals)),
        "decode_tok_s": (len(arrivals) - 1) / max(arrivals[-1] - arrivals[0], 1e-9),
        "server_decode_tok_s": float(timings.get("predicted_per_second") or 0.0),
        "prompt_tok_s": float(timings.get("prompt_per_second") or 0.0),
    }


def run_bench(
    entries: Sequence[CatalogEntry],
    engine: FoundEngine,
    *,
    tokens: int = 64,
    threads: int | None = None,
    repeats: int = 3,
    directory: Path | None = None,
    note: Callable[[str], None] = lambda _: None,
) -> list[BenchResult]:
    """Benchmark each entry in turn (one llama-server at a time); failures are reported in the
    result, not raised, so one bad model does not hide the others."""
    quantize = find_tool(engine, "llama-quantize")
    threads = threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    results: list[BenchResult] = []
    for entry in entries:
        base = BenchResult(
            model_id=entry.id, shape=entry.bench_shape, file_type=entry.file_type, threads=threads
        )
        try:
            model = prepare_bench_model(entry, quantize, directory=directory, note=note)
            busy = _busy_cores()
            note(f"{entry.id}: measuring decode speed, {repeats} x {tokens} tokens ({threads} threads)")
            measured = asyncio.run(
                measure_decode(engine.path, model, tokens=tokens, threads=threads, repeats=repeats)
            )
        except LaloError as exc:
            results.append(BenchResult(**{**asdict(base), "error": str(exc)}))
            continue
        synthetic_size = model.stat().st_size
        results.append(
            BenchResult(
                **{
                    **asdict(base),
                    "synthetic_size": synthetic_size,
                    "real_size": entry.size,
                    "expected_tok_s": round(measured["decode_tok_s"] * synthetic_size / entry.size, 1),
                    "tokens": int(measured["tokens"]),
                    "decode_tok_s": round(measured["decode_tok_s"], 1),
                    "server_decode_tok_s": round(measured["server_decode_tok_s"], 1) or None,
                    "prompt_tok_s": round(measured["prompt_tok_s"], 1) or None,
                    "load_seconds": round(measured["load_seconds"], 2),
                    "busy_cores": busy,
                    "runs": tuple(measured["runs"]),
                    "model_path": str(model),
                }
            )
        )
    return results


def _busy_cores() -> float | None:
    """How many cores other programs kept busy lately (the 1-minute load average)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # Windows has no load average
        return None


def format_bench(results: Sequence[BenchResult]) -> list[str]:
    width = max((len(r.model_id) for r in results), default=5)
    lines = [f"{'model':<{width}}  {'quant':<7} {'measured':>8}  {'expect':>6}  {'load s':>6}  note (tok/s)"]
    for r in results:
        if r.error:
            lines.append(f"{r.model_id:<{width}}  {r.file_type:<7} {'-':>8}  {'-':>6}  {'-':>6}  {r.error}")
            continue
        note = (
            f"best of {'/'.join(f'{run:g}' for run in r.runs)}; synthetic "
            f"{format_size(r.synthetic_size)} vs real ~{format_size(r.real_size)}"
        )
        lines.append(
            f"{r.model_id:<{width}}  {r.file_type:<7} {r.decode_tok_s or 0:>8.1f}  "
            f"{r.expected_tok_s or 0:>6.1f}  {r.load_seconds or 0:>6.2f}  {note}"
        )
    lines.append(
        "Measured on random weights of each model's shape and quantization (no download). "
        "'expect' scales that by file size (decoding reads every weight once per token): "
        "the speed to expect from the real file."
    )
    cores = psutil.cpu_count(logical=True) or 1
    busiest = max((r.busy_cores or 0.0 for r in results), default=0.0)
    if busiest > cores / 2:
        lines.append(
            f"Warning: other programs kept the CPU busy (load {busiest:.1f} on {cores} cores): "
            "expect faster decoding on an idle machine; run again when it is quieter."
        )
    return lines
