"""The fault suite: what a client sees when things go wrong around a real `lalo up`.

Runs the short fault cases (tests/support/faults.py and faults_http.py, also run by
tests/integration/test_faults.py), then a soak (32 streams for --soak-seconds with lalo's RSS
and open file descriptors sampled) and a load (--load-streams concurrent streams on a tiny
model, through lalo and against the same llama-server directly). Writes docs/reliability.md
and docs/reliability.json. Loopback only; every case is bounded in count and time.

    python bench/faults.py                 # full: 10 kill runs, soaks of 10 min and 1 hour, 256 streams
    python bench/faults.py --quick         # the short cases only, few runs (a few minutes)
    python bench/faults.py --quick --soak-seconds 20 --load-streams 32   # check soak and load
    python bench/faults.py --cases mixed --soak-seconds 0 --load-streams 0 \
        --models-soak-seconds 3600 --out /tmp/soak   # one hour over three models, max_loaded 1
    python bench/faults.py --cases power-cut-pull,power-cut-activity,power-cut-prompt-cache \
        --soak-seconds 0 --load-streams 0 --out /tmp/power-cut   # kill -9 of each writer 20 times
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support holds the cases the integration tests share

from launcher.models.synthetic import SHAPES, ModelShape, write_synthetic_model  # noqa: E402
from tests.support import faults, faults_http, power_cut  # noqa: E402
from tests.support.faults import CaseResult, Stack  # noqa: E402
from tests.support.lalo import LaloUp  # noqa: E402

# 64 wide, 2 layers, 32k vocab: decodes thousands of tokens/s, so the proxy is what is measured
TINY = ModelShape(n_embd=64, n_layer=2, n_head=4, n_head_kv=4, n_ff=256, n_vocab=32000)


def prepare(workdir: Path) -> tuple[Stack, Path]:
    from launcher.engines.registry import require_llama_server
    from tests.support.real_models import real_model

    server = require_llama_server().path
    workdir.mkdir(parents=True, exist_ok=True)
    models = []
    for seed, name in enumerate(("a", "b", "c"), start=1):
        path = workdir / f"demo-{name}.gguf"
        if not path.exists():
            write_synthetic_model(path, SHAPES["demo"], tensor_type="F16", seed=seed,
                                  name=f"fault suite {name} (random weights)")
        models.append(path)
    tiny = workdir / "tiny.gguf"
    if not tiny.exists():
        write_synthetic_model(tiny, TINY, tensor_type="F16", name="fault suite tiny (random weights)")
    stack = Stack(server=server, tiny=(models[0], models[1], models[2]),
                  smollm2=real_model("smollm2-135m-instruct"), workdir=workdir / "runs")
    return stack, tiny


SHORT_CASES: dict[str, Callable[..., CaseResult]] = {
    "kill-model": faults.kill_model_mid_stream,
    "sigstop": faults.sigstop_model,
    "kill-lalo": faults.kill_lalo,
    "disconnects": faults.early_disconnects,
    "mixed": faults.mixed_on_demand,
    "malformed": faults_http.malformed_http,
    "bad-json": faults_http.bad_json,
    # a power cut mid-write (issue 27): kill -9 at random points of each writer
    "power-cut-pull": power_cut.pull_kills,
    "power-cut-activity": power_cut.activity_kills,
    "power-cut-prompt-cache": power_cut.prompt_cache_kills,
    "power-cut-build": power_cut.build_kills,
}


# --- streams shared by the soak and the load -----------------------------------------------------
async def stream_once(client: httpx.AsyncClient, url: str, model: str, max_tokens: int,
                      headers: dict[str, str]) -> int:
    """Tokens of one streamed completion; raises on anything but a clean, complete stream."""
    body = {"model": model, "prompt": "Hello", "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True}
    tokens = 0
    done = False
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
            elif '"error"' in data:
                raise RuntimeError(f"error event: {data[:200]}")
            elif json.loads(data)["choices"][0].get("text"):
                tokens += 1
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    return tokens


def child_key(pid: int) -> str:
    """The per-start key lalo gave its own child (in the child's environment, not its argv)."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"LLAMA_API_KEY="):
            return item.split(b"=", 1)[1].decode()
    raise RuntimeError(f"no LLAMA_API_KEY in the environment of {pid}")


def tiny_lalo(stack: Stack, tiny: Path, case: str, parallel: int,
              queue: int) -> AbstractContextManager[LaloUp]:
    # llama-server serves as many connections as it has HTTP threads (parallel + 2 by default)
    # and drops the rest: the direct target needs one per stream; lalo opens `parallel` at most
    args = ["--threads-http", str(queue + 8)]
    return stack.lalo(case, {"tiny": {"file": str(tiny), "ctx_size": 256 * parallel,
                                      "parallel": parallel, "args": args}},
                      proxy={"queue_size": queue})


def check_flat(result: CaseResult, samples: Sequence[tuple[float, int, int, *tuple[int, ...]]]) -> None:
    """lalo's RSS and open fds over a soak, from (s, RSS, fds, ...) samples: the first quarter
    (after the first sample) against the last, as timings and two checks on `result`."""
    quarter = max(1, len(samples) // 4)
    head, tail = samples[1:quarter + 1] or samples[:1], samples[-quarter:]
    rss_base, rss_end = max(s[1] for s in head), max(s[1] for s in tail)
    fds_base, fds_end = max(s[2] for s in head), max(s[2] for s in tail)
    result.timings.update({
        "rss_start_mib": rss_base / 2**20, "rss_end_mib": rss_end / 2**20,
        "rss_max_mib": max(s[1] for s in samples) / 2**20,
        "fds_start": fds_base, "fds_end": fds_end, "fds_max": max(s[2] for s in samples)})
    result.check("RSS flat: last quarter within 10 % (+4 MiB) of the first",
                 rss_end <= rss_base * 1.10 + 4 * 2**20,
                 f"{rss_base / 2**20:.1f} -> {rss_end / 2**20:.1f} MiB")
    result.check("open fds flat: last quarter within 8 of the first", fds_end <= fds_base + 8,
                 f"{fds_base} -> {fds_end}")


# --- soak ----------------------------------------------------------------------------------------
def soak(stack: Stack, tiny: Path, seconds: float, streams: int = 32) -> CaseResult:
    """`streams` clients streaming back to back for `seconds`; lalo's RSS and fds sampled."""
    result = CaseResult(f"soak: {streams} streams for {seconds:g} s", streams)
    interval = max(1.0, min(10.0, seconds / 60))
    with tiny_lalo(stack, tiny, "soak", parallel=8, queue=streams * 2) as up:
        up.wait_state("tiny", "ready")
        assert up.proc is not None
        lalo = psutil.Process(up.proc.pid)
        samples: list[tuple[float, int, int]] = []
        errors: list[str] = []

        async def run() -> int:
            limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams,
                                  keepalive_expiry=3.0)
            stop_at = time.monotonic() + seconds
            async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:

                async def worker() -> int:
                    done = 0
                    while time.monotonic() < stop_at:
                        try:
                            await stream_once(client, up.url, "tiny", 48, {})
                            done += 1
                        except (httpx.HTTPError, RuntimeError) as exc:
                            errors.append(f"{type(exc).__name__}: {exc}"[:160])
                    return done

                async def sampler() -> None:
                    started = time.monotonic()
                    while time.monotonic() < stop_at:
                        samples.append((time.monotonic() - started, lalo.memory_info().rss,
                                        lalo.num_fds()))
                        await asyncio.sleep(interval)

                counts = await asyncio.gather(sampler(), *(worker() for _ in range(streams)))
                return sum(c for c in counts if c is not None)

        completed = asyncio.run(run())
    result.client_saw = f"{completed} complete streams, {len(errors)} errors" + (
        f" (first: {errors[0]})" if errors else "")
    result.errors, result.lost = len(errors), len(errors)
    result.timings = {"seconds": seconds, "streams_completed": completed}
    result.notes.append("samples (s, RSS MiB, fds): " + ", ".join(
        f"({t:.0f}, {r / 2**20:.1f}, {f})" for t, r, f in samples))
    result.check("0 errors", not errors, len(errors))
    check_flat(result, samples)
    return result


# --- soak over three models, max_loaded 1 -------------------------------------------------------
def _server_pids(model_dir: Path) -> set[int]:
    """llama-server processes serving a model file under `model_dir`, whoever their parent."""
    found = set()
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "llama-server" in (proc.info["name"] or "") and any(str(model_dir) in a for a in cmdline):
            found.add(proc.info["pid"])
    return found


async def _one_visit(client: httpx.AsyncClient, url: str, model: str, rng: random.Random) -> str:
    """One request to `model`: streamed or not; about one in five clients leaves early (after
    the first token, or at a random moment of a plain request). Returns what happened."""
    leave = rng.random() < 0.2
    stream = rng.random() < 0.5
    body = {"model": model, "prompt": "Hello", "max_tokens": rng.randint(8, 48),
            "temperature": 0, "stream": stream}
    if not stream:
        timeout = rng.uniform(0.05, 1.5) if leave else 300.0
        try:
            reply = await client.post(url + "/v1/completions", json=body, timeout=timeout)
        except httpx.TimeoutException:
            return "left" if leave else "timeout"
        if reply.status_code != 200:
            return f"HTTP {reply.status_code}: {reply.text[:120]}"
        return "ok" if reply.json().get("model") == model else "wrong model"
    async with client.stream("POST", url + "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            return f"HTTP {reply.status_code}: {(await reply.aread())[:120]!r}"
        async for line in reply.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return "ok"
            if '"error"' in data:
                return f"error event: {data[:120]}"
            if leave:
                return "left"  # closes the connection mid-answer
    return "stream ended without [DONE]"


def soak_models(stack: Stack, seconds: float, clients: int = 6) -> CaseResult:
    """Mixed traffic over three on-demand models with `max_loaded: 1` (every change of model is
    a swap) for `seconds`, clients leaving at random; lalo's RSS and fds and the number of
    llama-server processes sampled; after lalo stops, no llama-server of these models left."""
    result = CaseResult(f"soak: 3 models, max_loaded 1, {clients} clients for {seconds:g} s",
                        clients)
    names = ("a", "b", "c")
    models = {name: {"file": str(path), "ctx_size": 512, "preload": False}
              for name, path in zip(names, stack.tiny, strict=True)}
    model_dir = stack.tiny[0].parent
    interval = max(1.0, min(10.0, seconds / 120))
    outcomes: Counter[str] = Counter()
    samples: list[tuple[float, int, int, int]] = []
    with stack.lalo("soak-models", models, resources={"max_loaded": 1, "max_wait": 600},
                    proxy={"queue_size": 64}) as up:
        assert up.proc is not None
        lalo = psutil.Process(up.proc.pid)

        async def run() -> None:
            stop_at = time.monotonic() + seconds
            async with httpx.AsyncClient(timeout=300, trust_env=False) as client:

                async def worker(seed: int) -> None:
                    rng = random.Random(seed)
                    while time.monotonic() < stop_at:
                        try:
                            what = await _one_visit(client, up.url, rng.choice(names), rng)
                        except httpx.HTTPError as exc:
                            what = f"{type(exc).__name__}: {exc}"[:120]
                        outcomes[what if what in ("ok", "left") else "error: " + what] += 1

                async def sampler() -> None:
                    started = time.monotonic()
                    while time.monotonic() < stop_at:
                        servers = len(_server_pids(model_dir))
                        samples.append((time.monotonic() - started, lalo.memory_info().rss,
                                        lalo.num_fds(), servers))
                        await asyncio.sleep(interval)

                await asyncio.gather(sampler(), *(worker(seed) for seed in range(clients)))

        asyncio.run(run())
        loads = {m["name"]: m["loads"] for m in up.status()["models"]}
    time.sleep(2)
    orphans = _server_pids(model_dir)
    errors = {k: v for k, v in outcomes.items() if k.startswith("error: ")}
    lost = sum(errors.values())
    result.client_saw = (f"{outcomes['ok']} answered, {outcomes['left']} left early by the "
                         f"client, {lost} lost" + (f" ({next(iter(errors))})" if errors else ""))
    result.lost, result.errors, result.orphans = lost, lost, len(orphans)
    result.timings = {"seconds": seconds, "answered": outcomes["ok"], "left": outcomes["left"],
                      "loads": sum(loads.values()), "servers_max": max(s[3] for s in samples)}
    result.notes.append(f"loads per model: {loads}; outcomes: {dict(outcomes)}")
    result.notes.append("samples (s, RSS MiB, fds, servers): " + ", ".join(
        f"({t:.0f}, {r / 2**20:.1f}, {f}, {n})" for t, r, f, n in samples))
    result.check("0 lost", lost == 0, lost)
    result.check("swaps happened (loads > 3)", sum(loads.values()) > 3, sum(loads.values()))
    result.check("0 llama-server left after lalo stopped", not orphans, sorted(orphans))
    check_flat(result, samples)
    return result


# --- load ----------------------------------------------------------------------------------------
def load(stack: Stack, tiny: Path, streams: int, rounds: int = 3, max_tokens: int = 32) -> CaseResult:
    """`streams` concurrent streams through lalo and against the same llama-server directly,
    bursts alternated; aggregate tokens/s (median burst) and errors."""
    result = CaseResult(f"load: {streams} concurrent streams", rounds * 2)
    with tiny_lalo(stack, tiny, "load", parallel=8, queue=streams * 2) as up:
        model = up.wait_state("tiny", "ready")
        direct = (f"http://127.0.0.1:{model['port']}",
                  {"Authorization": f"Bearer {child_key(int(model['pid']))}"})
        targets: dict[str, tuple[str, dict[str, str]]] = {"direct": direct, "lalo": (up.url, {})}
        rates: dict[str, list[float]] = {name: [] for name in targets}
        errors: dict[str, list[str]] = {name: [] for name in targets}

        async def burst(url: str, headers: dict[str, str]) -> tuple[int, float, list[str]]:
            limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
            async with httpx.AsyncClient(timeout=300, limits=limits, trust_env=False) as client:
                started = time.perf_counter()
                outcomes = await asyncio.gather(
                    *(stream_once(client, url, "tiny", max_tokens, headers) for _ in range(streams)),
                    return_exceptions=True)
                wall = time.perf_counter() - started
            tokens = sum(o for o in outcomes if isinstance(o, int))
            failed = [f"{type(o).__name__}: {o}"[:160] for o in outcomes if isinstance(o, BaseException)]
            return tokens, wall, failed

        asyncio.run(burst(up.url, {}))  # warm up: connections, caches
        for round_number in range(rounds):
            order = list(targets) if round_number % 2 == 0 else list(reversed(targets))
            for name in order:
                tokens, wall, failed = asyncio.run(burst(*targets[name]))
                rates[name].append(tokens / wall)
                errors[name].extend(failed)
    median = {name: statistics.median(values) for name, values in rates.items()}
    ratio = median["lalo"] / median["direct"] if median["direct"] else 0.0  # direct all failed
    lost = len(errors["lalo"])
    result.client_saw = (f"lalo: {lost} errors, direct: {len(errors['direct'])} errors"
                         + (f" (first: {(errors['lalo'] or errors['direct'])[0]})"
                            if lost or errors["direct"] else ""))
    result.errors, result.lost = lost, lost
    result.timings = {"direct_tok_s": median["direct"], "lalo_tok_s": median["lalo"], "ratio": ratio}
    result.notes.append("bursts tok/s: " + "; ".join(
        f"{name} {', '.join(f'{v:.0f}' for v in values)}" for name, values in rates.items()))
    result.check("0 errors through lalo", lost == 0, lost)
    result.check("the direct target served every stream (else the ratio means nothing)",
                 not errors["direct"], len(errors["direct"]))
    result.check("aggregate tokens/s through lalo >= 0.9x direct", ratio >= 0.9, f"{ratio:.3f}")
    return result


# --- running and reporting -----------------------------------------------------------------------
def run_case(name: str, call: Callable[[], CaseResult]) -> CaseResult:
    print(f"fault suite: {name} ...", flush=True)
    started = time.monotonic()
    try:
        result = call()
    except Exception as exc:  # a case that breaks is a finding, not the end of the suite
        result = CaseResult(name, 0, client_saw=f"the case itself failed: {exc!r}"[:300])
        result.notes.append(traceback.format_exc())
        result.check("case ran to the end", False, repr(exc)[:200])
    result.timings["case_wall_s"] = time.monotonic() - started
    print(f"fault suite: {name}: {'ok' if result.ok else 'FAILED'} "
          f"({result.timings['case_wall_s']:.0f} s)", flush=True)
    if not result.ok:
        print(result.explain(), flush=True)
    return result


def _cell(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def _timings(timings: dict[str, float]) -> str:
    shown = {k: v for k, v in timings.items() if k != "case_wall_s"}
    return ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


def report(results: list[CaseResult], args: argparse.Namespace, out: Path) -> None:
    revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "launcher"],
                           capture_output=True, text=True).stdout.strip()
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "revision": revision,
            "launcher_modified": bool(dirty), "mode": "quick" if args.quick else "full",
            "kill_runs": args.kill_runs, "soak_seconds": args.soak_seconds,
            "models_soak_seconds": args.models_soak_seconds,
            "load_streams": args.load_streams, "cpus": os.cpu_count(),
            "python": platform.python_version()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability.json").write_text(json.dumps(
        {"meta": meta, "cases": [r.as_dict() for r in results]}, indent=1, default=str))
    command = " ".join(["python bench/faults.py", *sys.argv[1:]])
    passed = sum(r.ok for r in results)
    lines = [
        "# Reliability: the fault suite",
        "",
        f"Made by `{command}` on {meta['date'][:10]} at revision {revision}"
        f"{' (launcher/ modified)' if dirty else ''}, {meta['cpus']} CPUs, "
        f"{meta['mode']} mode. A real `lalo up` with real llama-server children, driven from "
        "outside only: HTTP clients, raw sockets and signals (cases in "
        "`tests/support/faults.py`, `faults_http.py`; the short ones also run as "
        "`tests/integration/test_faults.py`). Models: the real SmolLM2-135M-Instruct where the "
        "answer is checked (\"Paris\"), random-weight models elsewhere.",
        "",
        f"**{passed} of {len(results)} cases meet every target.**",
        "",
        "| case | runs | what the client saw | lost | orphans | errors | timings (s) | targets met |",
        "|---|---:|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        met = sum(c.ok for c in r.checks)
        saw = " ".join(r.client_saw.split()).replace("|", "\\|")
        if len(saw) > 400:
            saw = saw[:400] + " ..."
        lines.append(f"| {r.case} | {r.runs} | {saw} | {_cell(r.lost)} | {_cell(r.orphans)} | "
                     f"{_cell(r.errors)} | {_timings(r.timings)} | "
                     f"{'yes' if r.ok else 'NO'} ({met}/{len(r.checks)}) |")
    lines += ["", "Lost: requests that should have been answered and were not. Orphans: "
              "processes left behind. Errors: answers the issue does not allow (5xx where it "
              "demands 200 or 4xx, hangs, broken streams). n/a: the case has no such thing.", "",
              "## Targets, case by case", ""]
    for r in results:
        lines.append(f"### {r.case}")
        lines.append("")
        for c in r.checks:
            lines.append(f"- {'met' if c.ok else '**not met**'}: {c.name} (measured: {c.measured})")
        for note in r.notes:
            if "Traceback" not in note:
                lines.append(f"- note: {note[:600]}")
        lines.append("")
    if not args.soak_seconds or not args.load_streams:
        lines += ["The soak and the load did not run in this mode. Full run: "
                  "`python bench/faults.py` (10-minute soak, 256 streams).", ""]
    (out / "reliability.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short cases only, few runs: what the integration tests run")
    parser.add_argument("--kill-runs", type=int, help="kill -9 mid-stream runs (default 10, quick 2)")
    parser.add_argument("--power-cut-runs", type=int,
                        help="kill -9 runs per power-cut case (default 20, quick 1)")
    parser.add_argument("--soak-seconds", type=float, help="soak length (default 600, quick 0: off)")
    parser.add_argument("--models-soak-seconds", type=float,
                        help="soak over three models with max_loaded 1 (default 3600, quick 0: off)")
    parser.add_argument("--load-streams", type=int, help="concurrent streams (default 256, quick 0: off)")
    parser.add_argument("--cases", help=f"comma-separated subset of {', '.join(SHORT_CASES)}")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lalo-faults")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    args.kill_runs = args.kill_runs if args.kill_runs is not None else (2 if args.quick else 10)
    if args.soak_seconds is None:
        args.soak_seconds = 0.0 if args.quick else 600.0
    if args.models_soak_seconds is None:
        args.models_soak_seconds = 0.0 if args.quick else 3600.0
    if args.load_streams is None:
        args.load_streams = 0 if args.quick else 256
    wanted = args.cases.split(",") if args.cases else list(SHORT_CASES)
    unknown = set(wanted) - set(SHORT_CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    stack, tiny = prepare(args.workdir)
    runs_dir = stack.workdir
    if runs_dir.exists():
        import shutil

        shutil.rmtree(runs_dir)
    power_cuts = args.power_cut_runs if args.power_cut_runs is not None else (1 if args.quick else 20)
    repeat = {"kill-model": args.kill_runs, "sigstop": 1 if args.quick else 3,
              "kill-lalo": 1 if args.quick else 3,
              **{name: power_cuts for name in SHORT_CASES if name.startswith("power-cut-")}}
    results = []
    for name in wanted:
        case = SHORT_CASES[name]
        call = (functools.partial(case, stack, repeat[name]) if name in repeat
                else functools.partial(case, stack))
        results.append(run_case(name, call))
    if args.soak_seconds:
        results.append(run_case("soak", lambda: soak(stack, tiny, args.soak_seconds)))
    if args.models_soak_seconds:
        results.append(run_case("soak-models",
                                lambda: soak_models(stack, args.models_soak_seconds)))
    if args.load_streams:
        results.append(run_case("load", lambda: load(stack, tiny, args.load_streams)))
    report(results, args, args.out)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
