"""`lalo doctor`: this machine's CPU, RAM, disk and engines, which catalog models fit, and
(`--bench`) the decode speed each would get, measured on random weights of the same shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from launcher import paths
from launcher.config import ResourcesConfig
from launcher.engines.registry import FoundEngine, find_tool, list_engines
from launcher.errors import EngineError, LaloError
from launcher.estimate import estimate_memory
from launcher.models.catalog import Catalog, CatalogEntry, default_catalog
from launcher.models.hub import HubClient
from launcher.models.synthetic import WRITABLE_TYPES, shape_named, write_synthetic_model
from launcher.planner import Budget, Candidate, compute_budget, make_plan
from launcher.supervisor import platform as proc
from launcher.units import format_size

log = logging.getLogger(__name__)
GIB = 1024**3

# CPU features that decide which llama.cpp kernels run (x86 SIMD, ARM NEON/dot product).
FEATURES = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "neon",
    "dotprod",
    "i8mm",
    "sve",
)


@dataclass(frozen=True)
class Tier:
    """A hardware tier of the original plan, as numbers lalo can check."""

    name: str
    min_ram: int
    min_cores: int
    means: str


# The plan's tiers (8 GB dev laptop, then its $500 / $2,000 / $10,000 / $50,000 machines).
TIERS: tuple[Tier, ...] = (
    Tier("dev laptop", 8 * GIB, 2, "350M-1.2B models at Q4_K_M, two or three loaded at once"),
    Tier("tier 1 (entry)", 16 * GIB, 8, "every catalog model at once on CPU"),
    Tier("tier 2 (standard)", 32 * GIB, 12, "7B models at Q4_K_M on CPU; a 16 GB GPU in the plan"),
    Tier("tier 3 (pro)", 64 * GIB, 16, "14B models; a 24 GB GPU in the plan"),
    Tier("tier 4 (enterprise)", 256 * GIB, 32, "70B+ models; data-centre GPUs in the plan"),
)


@dataclass(frozen=True)
class CpuInfo:
    model: str
    machine: str
    physical_cores: int
    logical_cores: int
    features: tuple[str, ...]


@dataclass(frozen=True)
class ModelFit:
    """A catalog model's estimate at its default context on this machine."""

    id: str
    file_type: str
    size: int
    ctx_size: int
    estimate: int
    fits_now: bool  # within the auto budget (available RAM minus the reserve)
    fits_machine: bool  # within total RAM minus the reserve (after closing other programs)
    cached: bool
    license: str


@dataclass(frozen=True)
class DoctorReport:
    system: str
    python: str
    cpu: CpuInfo
    ram_total: int
    ram_available: int
    budget: Budget
    disk_path: str
    disk_free: int
    gpus: tuple[str, ...]
    engines: tuple[dict[str, Any], ...]
    engine_error: str | None
    tier: Tier | None
    models: tuple[ModelFit, ...]
    fit_together: tuple[str, ...]  # the catalog models that load side by side now, in order

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["budget"] = {"bytes": self.budget.bytes, "source": self.budget.source}
        return data


def cpu_info() -> CpuInfo:
    machine = platform.machine().lower()
    model, flags = _cpu_model_and_flags(machine)
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    return CpuInfo(
        model=model,
        machine=machine,
        physical_cores=physical,
        logical_cores=logical,
        features=tuple(name for name in FEATURES if name in flags),
    )


def _cpu_model_and_flags(machine: str) -> tuple[str, set[str]]:
    """CPU name and feature flags: /proc/cpuinfo on Linux, sysctl on macOS, else what the
    architecture guarantees (64-bit ARM always has NEON)."""
    flags: set[str] = set()
    model = platform.processor() or machine
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and value.strip():
                    model = value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
        flags |= {"dotprod"} if "asimddp" in flags else set()
        flags |= {"neon"} if "asimd" in flags else set()
    elif sys.platform == "darwin":
        model = _sysctl("machdep.cpu.brand_string") or model
        text = " ".join(
            _sysctl(key) or "" for key in ("machdep.cpu.features", "machdep.cpu.leaf7_features")
        ).lower()
        flags.update(word.replace(".", "_") for word in text.split())
        flags |= {"avx2"} if "avx2" in flags else set()
        if machine in ("arm64", "aarch64"):
            flags.add("neon")
            if _sysctl("hw.optional.arm.FEAT_DotProd") == "1":
                flags.add("dotprod")
            if _sysctl("hw.optional.arm.FEAT_I8MM") == "1":
                flags.add("i8mm")
    elif machine in ("arm64", "aarch64"):
        flags.add("neon")
    return model, flags


def _sysctl(key: str) -> str | None:
    try:
        done = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def gpus() -> tuple[str, ...]:
    """NVIDIA GPUs as nvidia-smi names them ("NVIDIA H100 80GB HBM3, 81559 MiB"); the
    engines lalo builds run on the CPU, so this is for information and tiers only."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return ()
    try:
        done = subprocess.run(
            [tool, "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return tuple(line.strip() for line in done.stdout.splitlines() if line.strip())


def machine_tier(ram_total: int, cores: int) -> Tier | None:
    """The highest tier whose RAM (nominal, so 90 % of it counts) and core count are met."""
    reached: Tier | None = None
    for tier in TIERS:
        if ram_total >= tier.min_ram * 0.9 and cores >= tier.min_cores:
            reached = tier
    return reached


def collect_report(
    *,
    catalog: Catalog | None = None,
    client: HubClient | None = None,
    engines_configured: str = "auto",
    resources: ResourcesConfig | None = None,
) -> DoctorReport:
    entries = catalog if catalog is not None else default_catalog()
    hub = client if client is not None else HubClient()
    reserve = (resources or ResourcesConfig()).ram_reserve
    memory = psutil.virtual_memory()
    budget = compute_budget((resources or ResourcesConfig()).ram_budget, reserve, memory.available)
    cpu = cpu_info()
    disk_path = _existing_parent(hub.settings.cache_dir)
    engine_error: str | None = None
    try:
        found = list_engines(engines_configured)
    except EngineError as exc:
        found, engine_error = [], str(exc)
    fits: list[ModelFit] = []
    candidates: list[Candidate] = []
    for entry in entries:
        estimate = estimate_memory(entry.facts(), entry.default_ctx).total
        fits.append(
            ModelFit(
                id=entry.id,
                file_type=entry.file_type,
                size=entry.size,
                ctx_size=entry.default_ctx,
                estimate=estimate,
                fits_now=estimate <= budget.bytes,
                fits_machine=estimate <= memory.total - reserve,
                cached=hub.cached_path(entry.hub_file()) is not None,
                license=entry.license.id,
            )
        )
        candidates.append(
            Candidate(entry.id, estimate, preload=True, facts=entry.facts(), ctx_size=entry.default_ctx)
        )
    plan = make_plan(candidates, budget)
    return DoctorReport(
        system=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        cpu=cpu,
        ram_total=memory.total,
        ram_available=memory.available,
        budget=budget,
        disk_path=str(disk_path),
        disk_free=shutil.disk_usage(disk_path).free,
        gpus=gpus(),
        engines=tuple(_engine_json(engine) for engine in found),
        engine_error=engine_error,
        tier=machine_tier(memory.total, cpu.physical_cores),
        models=tuple(fits),
        fit_together=tuple(d.name for d in plan.decisions if d.action == "start"),
    )


def _engine_json(engine: FoundEngine) -> dict[str, Any]:
    return {
        "kind": engine.kind,
        "path": str(engine.path),
        "origin": engine.origin,
        "version": engine.version,
        "variant": engine.variant,
    }


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def format_report(report: DoctorReport) -> list[str]:
    cpu = report.cpu
    lines = [
        f"system      {report.system}, Python {report.python}",
        f"cpu         {cpu.model} ({cpu.machine}), {cpu.physical_cores} cores / {cpu.logical_cores} threads",
        f"features    {' '.join(cpu.features) or 'none of ' + ', '.join(FEATURES[:5])}",
        f"ram         {format_size(report.ram_total)} total, {format_size(report.ram_available)} "
        f"available; budget {format_size(report.budget.bytes)} ({report.budget.source})",
        f"disk        {format_size(report.disk_free)} free in {report.disk_path}",
        f"gpu         {'; '.join(report.gpus) or 'none found'} (lalo's engines run on the CPU)",
    ]
    if report.engines:
        for engine in report.engines:
            lines.append(
                f"engine      {engine['kind']} {engine['version'] or '(version unknown)'} "
                f"[{engine['origin']}] {engine['path']}"
            )
    else:
        lines.append(f"engine      none found ({report.engine_error or 'run `lalo engine build`'})")
    tier = report.tier
    lines.append(
        f"tier        {tier.name}: {tier.means}"
        if tier
        else "tier        below the plan's 8 GB dev laptop: only the smallest models"
    )
    higher = TIERS[TIERS.index(tier) + 1 :] if tier else TIERS
    if higher:
        lines.append(
            f"            ({higher[0].name} needs {format_size(higher[0].min_ram)} RAM and "
            f"{higher[0].min_cores} cores)"
        )
    lines.append("")
    width = max((len(m.id) for m in report.models), default=5)
    lines.append(f"{'model':<{width}}  {'file':>9}  {'ctx':>5}  {'needs':>9}  fits now  cached  licence")
    for m in report.models:
        verdict = "yes" if m.fits_now else ("after freeing RAM" if m.fits_machine else "no")
        lines.append(
            f"{m.id:<{width}}  {format_size(m.size):>9}  {m.ctx_size:>5}  "
            f"{format_size(m.estimate):>9}  {verdict:<8}  {'yes' if m.cached else 'no':<6}  "
            f"{m.license}"
        )
    together = ", ".join(report.fit_together) or "none"
    lines.append(f"loaded together now: {together}")
    return lines


# --- decode benchmark on random weights -------------------------------------------------------
BENCH_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
LOAD_TIMEOUT = 300.0
REQUEST_TIMEOUT = 300.0
STOP_TIMEOUT = 10.0
HEALTH_INTERVAL = 0.1


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
    """Start llama-server on `model`, warm up, stream `tokens` tokens `repeats` times, stop it.

    Returns the fastest run's decode_tok_s (first to last streamed token),
    server_decode_tok_s and prompt_tok_s (the fastest is the one other programs disturbed
    least), every run's decode speed as `runs`, and load_seconds; LaloError with the
    server's last log lines if it fails.
    """
    threads = threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    port = proc.free_port()
    argv = [
        str(server),
        "-m",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        str(ctx_size),
        "-np",
        "1",
        "-t",
        str(threads),
    ]
    log_path = log_path or model.with_suffix(".bench.log")
    with log_path.open("wb") as log_file:
        started = time.monotonic()
        child = await proc.spawn(argv, {}, stdout=log_file.fileno())
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", timeout=REQUEST_TIMEOUT
            ) as http:
                await _wait_ready(http, child, log_path)
                load_seconds = time.monotonic() - started
                await _stream_completion(http, 8)  # warm-up: caches, page-ins, first allocation
                runs = [await _stream_completion(http, tokens) for _ in range(max(1, repeats))]
        except httpx.HTTPError as exc:
            raise LaloError(
                f"llama-server stopped answering ({type(exc).__name__}: {exc}): {_tail(log_path)}"
            ) from exc
        finally:
            await _stop(child)
    best = max(runs, key=lambda run: run["decode_tok_s"])
    return {**best, "runs": [round(run["decode_tok_s"], 1) for run in runs], "load_seconds": load_seconds}


async def _wait_ready(http: httpx.AsyncClient, child: asyncio.subprocess.Process, log_path: Path) -> None:
    deadline = time.monotonic() + LOAD_TIMEOUT
    while time.monotonic() < deadline:
        if child.returncode is not None:
            raise LaloError(f"llama-server exited with {child.returncode} while loading: {_tail(log_path)}")
        with contextlib.suppress(httpx.TransportError):
            if (await http.get("/health", timeout=2.0)).status_code == 200:
                return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(child.wait(), HEALTH_INTERVAL)
    raise LaloError(f"llama-server did not become ready in {LOAD_TIMEOUT:.0f} s: {_tail(log_path)}")


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


async def _stop(child: asyncio.subprocess.Process) -> None:
    if child.returncode is not None:
        return
    proc.terminate_group(child.pid)
    try:
        await asyncio.wait_for(child.wait(), STOP_TIMEOUT)
    except TimeoutError:
        proc.kill_group(child.pid)
        await child.wait()


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"


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
