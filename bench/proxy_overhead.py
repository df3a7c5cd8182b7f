"""What lalo's proxy costs: the same llama-server measured directly and through lalo, interleaved.

Also llama-server's own router mode (`--models-dir`) on the same model files, as the peer.
Measures, in one run:
  - streamed decode tokens/s (350M-shape Q4_K_M random-weight model), ratio lalo / direct
  - time to first token on a tiny model (where proxy cost shows most): p50 / p99 added
  - 32 concurrent streams: errors and aggregate tokens/s ratio
  - the proxy's own CPU seconds per 1,000 streamed tokens
With `--upstream-clients ours,aiohttp` a second lalo runs with aiohttp's client in place of
lalo's own upstream client (bench/aiohttp_upstream.py), measured interleaved as "lalo-aiohttp".
Writes docs/proxy-benchmark.md, docs/proxy-benchmark.json and docs/proxy-benchmark.png.

    python bench/proxy_overhead.py [--samples 500] [--decode-rounds 30] [--server PATH]
                                   [--upstream-clients ours,aiohttp] [--no-router]
                                   [--baseline OTHER_CHECKOUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from launcher.models.synthetic import SHAPES, ModelShape, write_synthetic_model

ROOT = Path(__file__).resolve().parent.parent
TINY = ModelShape(n_embd=64, n_layer=2, n_head=4, n_head_kv=4, n_ff=256, n_vocab=32000)


@dataclass
class Target:
    name: str
    url: str  # base URL up to and excluding /v1
    model: str
    headers: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_models(workdir: Path, server: Path) -> tuple[Path, Path]:
    tiny = workdir / "tiny.gguf"
    if not tiny.exists():
        write_synthetic_model(tiny, TINY, tensor_type="F16", name="bench tiny (random weights)")
    medium = workdir / "medium.gguf"
    if not medium.exists():
        f16 = write_synthetic_model(workdir / "medium-f16.tmp", SHAPES["llama-350m"],
                                    name="bench 350M (random weights)")
        subprocess.run([str(server.parent / "llama-quantize"), str(f16), str(medium), "Q4_K_M"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        f16.unlink()
    return tiny, medium


RECONNECTS: dict[str, int] = {}  # per target: requests retried on a closed keep-alive connection


async def stream_once(client: httpx.AsyncClient, target: Target, max_tokens: int,
                      prompt: str = "Hello") -> tuple[float, list[float]]:
    """(time to first token, arrival times of every token) for one streamed completion."""
    body = {"model": target.model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True, "cache_prompt": False}
    # llama-server's HTTP library closes a keep-alive connection after 100 requests without
    # saying so on streamed replies: a reused connection may be gone before any byte comes
    # back. Retry that case once, on a new connection, with the clock restarted.
    for attempt in (1, 2):
        started = time.perf_counter()
        arrivals: list[float] = []
        try:
            async with client.stream("POST", target.url + "/v1/completions", json=body,
                                     headers=target.headers) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()!r}")
                async for line in response.aiter_lines():
                    if line.startswith("data:") and '"text"' in line:
                        arrivals.append(time.perf_counter())
            break
        except httpx.RemoteProtocolError as exc:
            if attempt == 2 or arrivals:
                raise RuntimeError(f"{target.name}: {exc!r}") from exc
            RECONNECTS[target.name] = RECONNECTS.get(target.name, 0) + 1
        except (httpx.HTTPError, RuntimeError) as exc:
            raise RuntimeError(f"{target.name}: {exc!r}") from exc
    if not arrivals:
        raise RuntimeError(f"{target.name}: no tokens")
    return arrivals[0] - started, arrivals


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def measure(targets_tiny: list[Target], targets_medium: list[Target], samples: int,
                  decode_rounds: int, lalo_pids: dict[str, int]) -> dict[str, Any]:
    results: dict[str, Any] = {"ttft": {}, "decode": {}, "concurrent": {}, "cpu": {}}
    # servers close idle keep-alive connections after 5 s: never reuse one that old
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=3.0)
    async with httpx.AsyncClient(timeout=300, limits=limits, trust_env=False) as client:
        for target in targets_tiny + targets_medium:  # warm up: loads, caches, connections
            await stream_once(client, target, 8)
        # time to first token, tiny model, interleaved
        ttft: dict[str, list[float]] = {t.name: [] for t in targets_tiny}
        for round_number in range(samples):
            shift = round_number % len(targets_tiny)
            for target in targets_tiny[shift:] + targets_tiny[:shift]:
                first, _ = await stream_once(client, target, 1)
                ttft[target.name].append(first)
        results["ttft"] = ttft
        # streamed decode speed, 350M model, interleaved
        decode: dict[str, list[float]] = {t.name: [] for t in targets_medium}
        for round_number in range(decode_rounds):
            # rotate who goes first each round: no target always runs right after another
            shift = round_number % len(targets_medium)
            for target in targets_medium[shift:] + targets_medium[:shift]:
                _, arrivals = await stream_once(client, target, 128)
                decode[target.name].append((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]))
        results["decode"] = decode
        # 32 concurrent streams on the tiny model (4 slots), three bursts per target taken in
        # turn; the median burst counts. The proxy's CPU is summed over its bursts.
        proxies = {name: psutil.Process(pid) for name, pid in lalo_pids.items()}
        bursts: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets_tiny}
        proxy_cpu = dict.fromkeys(proxies, 0.0)
        for round_number in range(3):
            shift = round_number % len(targets_tiny)
            for target in targets_tiny[shift:] + targets_tiny[:shift]:
                proxy = proxies.get(target.name)
                cpu_before = sum(proxy.cpu_times()[:2]) if proxy is not None else 0.0
                started = time.perf_counter()
                outcomes = await asyncio.gather(
                    *(stream_once(client, target, 64) for _ in range(32)), return_exceptions=True)
                wall = time.perf_counter() - started
                if proxy is not None:
                    proxy_cpu[target.name] += sum(proxy.cpu_times()[:2]) - cpu_before
                tokens = sum(len(o[1]) for o in outcomes if not isinstance(o, BaseException))
                errors = [repr(o) for o in outcomes if isinstance(o, BaseException)]
                bursts[target.name].append({"errors": len(errors), "error_examples": errors[:3],
                                            "tokens": tokens, "seconds": wall,
                                            "tokens_per_s": tokens / wall})
        for name, runs in bursts.items():
            results["concurrent"][name] = {
                "streams": 32, "bursts": runs,
                "errors": sum(run["errors"] for run in runs),
                "tokens_per_s": statistics.median(run["tokens_per_s"] for run in runs),
            }
        for name, seconds in proxy_cpu.items():
            results["cpu"][name] = {"lalo_cpu_seconds": seconds,
                                    "tokens": sum(run["tokens"] for run in bursts[name])}
    results["reconnects"] = dict(RECONNECTS)
    return results


def start_router(server: Path, models_dir: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(server), "--models-dir", str(models_dir), "--host", "127.0.0.1", "--port", str(port),
         "-c", "4096", "-np", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=parent_death_signal)  # the router and its children die with this script


_BENCH_PID = os.getpid()


def parent_death_signal() -> None:
    """preexec_fn: the child dies with this script (it runs in the child, so the parent's pid
    is the one taken when this module was imported)."""
    from launcher.supervisor import platform

    if platform.IS_LINUX:
        platform.set_parent_death_signal(_BENCH_PID)


def wait_http(url: str, timeout: float = 120, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1, headers=headers or {}, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def child_key(pid: int) -> str:
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"LLAMA_API_KEY="):
            return item.split(b"=", 1)[1].decode()
    raise RuntimeError("no key")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500,
                        help="time-to-first-token rounds (each asks all three targets)")
    parser.add_argument("--decode-rounds", type=int, default=30)
    parser.add_argument("--server", type=Path)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lalo-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--upstream-clients", default="ours",
                        help="comma-separated: ours (lalo's own client), aiohttp")
    parser.add_argument("--no-router", action="store_true",
                        help="leave llama-server's router mode out (a quicker check)")
    parser.add_argument("--baseline", type=Path,
                        help="another lalo checkout (e.g. a worktree of the old main) run beside "
                             "this one, interleaved, as `lalo-baseline`")
    args = parser.parse_args()
    if args.server is None:
        from launcher.engines.registry import require_llama_server

        args.server = require_llama_server().path
    args.workdir.mkdir(parents=True, exist_ok=True)
    tiny, medium = prepare_models(args.workdir, args.server)
    models_dir = args.workdir / "router-models"
    models_dir.mkdir(exist_ok=True)
    for path in (tiny, medium):
        link = models_dir / path.name
        if not link.exists():
            link.symlink_to(path)

    state = args.workdir / "state"
    shutil.rmtree(state, ignore_errors=True)
    config = args.workdir / "lalo.yaml"
    config.write_text(yaml.safe_dump({
        "engines": {"llama_server": {"path": str(args.server)}},
        "models": {
            "tiny": {"file": str(tiny), "ctx_size": 4096, "parallel": 4},
            "medium": {"file": str(medium), "ctx_size": 4096, "parallel": 4},
        },
    }))
    clients = [c.strip() for c in args.upstream_clients.split(",") if c.strip()]
    unknown = set(clients) - {"ours", "aiohttp"}
    if unknown or not clients:
        parser.error(f"--upstream-clients: unknown {sorted(unknown)}; use ours and/or aiohttp")
    lalos: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    router: subprocess.Popen[bytes] | None = None
    try:
        runs = [("lalo" if c == "ours" else f"lalo-{c}", c, ROOT) for c in clients]
        if args.baseline is not None:
            runs.append(("lalo-baseline", "ours", args.baseline.resolve()))
        for name, client, checkout in runs:
            port = free_port()
            # `python -m launcher` in a checkout runs that checkout's code
            env = {**os.environ, "LALO_STATE_DIR": str(state / name), "PYTHONPATH": str(checkout)}
            entry = ([sys.executable, "-m", "launcher"] if client == "ours" else
                     [sys.executable, str(ROOT / "bench" / "aiohttp_upstream.py")])
            lalos[name] = (subprocess.Popen(
                [*entry, "up", "--config", str(config), "--port", str(port)], env=env, cwd=checkout,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), f"http://127.0.0.1:{port}")
        router_port = free_port()
        if not args.no_router:
            router = start_router(args.server, models_dir, router_port)
        ready = {name: wait_ready(url) for name, (_, url) in lalos.items()}
        if router is not None:
            wait_http(f"http://127.0.0.1:{router_port}/health")
        first = next(iter(ready.values()))

        def direct(name: str) -> Target:
            model = first[name]
            return Target("direct", f"http://127.0.0.1:{model['port']}", name,
                          {"Authorization": f"Bearer {child_key(model['pid'])}"})

        def via_lalos(name: str) -> list[Target]:
            return [Target(label, url, name) for label, (_, url) in lalos.items()]

        def via_router(path: Path) -> list[Target]:
            if router is None:
                return []
            return [Target("router", f"http://127.0.0.1:{router_port}", path.stem)]

        tiny_targets = [direct("tiny"), *via_lalos("tiny"), *via_router(tiny)]
        medium_targets = [direct("medium"), *via_lalos("medium"), *via_router(medium)]
        pids = {name: proc.pid for name, (proc, _) in lalos.items()}
        results = asyncio.run(measure(tiny_targets, medium_targets, args.samples,
                                      args.decode_rounds, pids))
        results["lalo_rss"] = {name: psutil.Process(pid).memory_info().rss
                               for name, pid in pids.items()}
    finally:
        for proc, _ in lalos.values():
            proc.terminate()
        for proc, _ in lalos.values():
            proc.wait(60)
        if router is not None:
            os.killpg(router.pid, 15)
            router.wait(30)
    report(results, args.out, args.samples)


def wait_ready(lalo_url: str) -> dict[str, dict[str, Any]]:
    """Every model of that lalo ready: its status rows by name."""
    wait_http(lalo_url + "/health")
    deadline = time.monotonic() + 120
    while True:
        status = httpx.get(lalo_url + "/api/status", trust_env=False).json()
        models = {m["name"]: m for m in status["models"]}
        if all(m["state"] == "ready" for m in models.values()):
            return models
        if time.monotonic() > deadline:
            raise RuntimeError(f"models not ready: {models}")
        time.sleep(0.2)


def report(results: dict[str, Any], out: Path, samples: int) -> None:
    ttft = results["ttft"]
    decode = results["decode"]
    ms = {name: [v * 1000 for v in values] for name, values in ttft.items()}
    names = list(ms)  # direct first, then each lalo, then the router
    summary: dict[str, Any] = {"samples": samples}
    for name in names:
        summary[name] = {
            "ttft_p50_ms": statistics.median(ms[name]),
            "ttft_p99_ms": percentile(ms[name], 99),
            "decode_tok_s": statistics.median(decode[name]),
            "concurrent": results["concurrent"][name],
        }
    direct = summary["direct"]
    for name in names[1:]:
        row = summary[name]
        row["ttft_added_p50_ms"] = row["ttft_p50_ms"] - direct["ttft_p50_ms"]
        row["ttft_added_p99_ms"] = row["ttft_p99_ms"] - direct["ttft_p99_ms"]
        row["decode_ratio"] = row["decode_tok_s"] / direct["decode_tok_s"]
        row["concurrent_ratio"] = (row["concurrent"]["tokens_per_s"]
                                   / direct["concurrent"]["tokens_per_s"])
    for name, cpu in results["cpu"].items():
        summary[name]["cpu_s_per_1000_tokens"] = cpu["lalo_cpu_seconds"] / cpu["tokens"] * 1000
    summary["lalo_rss"] = results["lalo_rss"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "proxy-benchmark.json").write_text(json.dumps({"summary": summary, "raw": results}, indent=1))
    plotted = plot(ms, decode, out / "proxy-benchmark.png")
    proxies = names[1:]
    rows = [summary[name] for name in names]

    def line(label: str, cells: list[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    def added(row: dict[str, Any]) -> str:
        if "ttft_added_p50_ms" not in row:
            return "-"
        return f"{row['ttft_added_p50_ms']:+.2f} / {row['ttft_added_p99_ms']:+.2f}"

    lines = [
        "# Proxy overhead: llama-server direct vs through lalo vs llama-server router mode",
        "",
        "Made by `python bench/proxy_overhead.py` in one run, requests interleaved "
        f"({', '.join(names)}) so machine noise hits all alike. Random-weight models: "
        "a tiny one (64 wide, 2 layers, 32k vocab) for time to first token and concurrency, a "
        "350M-shape Q4_K_M one for decode speed. Same llama-server binary; the direct target is "
        "the very child process the first lalo started. `lalo-aiohttp` (when present) is lalo "
        "with aiohttp's client in place of its own upstream client (bench/aiohttp_upstream.py).",
        "",
        line("", names),
        "|---|" + "---:|" * len(names),
        line(f"TTFT p50 (ms, tiny model, {samples} samples)", [f"{r['ttft_p50_ms']:.2f}" for r in rows]),
        line("TTFT p99 (ms)", [f"{r['ttft_p99_ms']:.2f}" for r in rows]),
        line("added TTFT p50 / p99 (ms)", [added(r) for r in rows]),
        line(f"streamed decode tok/s (350M Q4_K_M, 128 tokens, median of {len(decode['direct'])})",
             [f"{r['decode_tok_s']:.1f}" for r in rows]),
        line("decode ratio vs direct", ["1"] + [f"{summary[n]['decode_ratio']:.3f}" for n in proxies]),
        line("32 concurrent streams: errors (3 bursts)", [str(r["concurrent"]["errors"]) for r in rows]),
        line("32 concurrent streams: aggregate tok/s (median of 3 bursts)",
             [f"{r['concurrent']['tokens_per_s']:.0f}" for r in rows]),
        line("aggregate ratio vs direct",
             ["1"] + [f"{summary[n]['concurrent_ratio']:.3f}" for n in proxies]),
        line("proxy CPU s per 1,000 streamed tokens (32 streams)",
             [f"{r['cpu_s_per_1000_tokens']:.3f}" if "cpu_s_per_1000_tokens" in r else "-"
              for r in rows]),
        "",
        "lalo's RSS: " + ", ".join(f"{name} {rss / 2**20:.0f} MiB"
                                   for name, rss in summary["lalo_rss"].items()) + ".",
        "",
        "Targets: decode ratio >= 0.98, added TTFT p50 <= 2 ms and p99 <= 5 ms, 32 streams with "
        "0 errors and aggregate ratio >= 0.95.",
        "",
        "Read the signs with care: on a shared 2-core machine, differences under about 2 ms and "
        "ratios within about 10 % move between runs (a negative added TTFT is noise, not a "
        "proxy faster than its upstream). The concurrency bursts are not interleaved at the "
        "request level, so they carry the most noise.",
        "",
        "Requests retried on a keep-alive connection the server had already closed "
        "(llama-server's HTTP library drops one after 100 requests; the retry restarts the "
        f"clock): {results.get('reconnects') or 'none'}.",
        *(["", "![TTFT and decode speed](proxy-benchmark.png)"] if plotted else []),
    ]
    (out / "proxy-benchmark.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(ttft_ms: dict[str, list[float]], decode: dict[str, list[float]], path: Path) -> bool:
    """The figure, when matplotlib is installed (no extra brings it: the report does not need it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False

    names = list(ttft_ms)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.boxplot([ttft_ms[n] for n in names], showfliers=True)
    left.set_xticks(range(1, len(names) + 1), names)
    left.set_ylabel("time to first token (ms)")
    left.set_title("tiny model, interleaved samples")
    colors = ["#777", "#2a7", "#a72", "#57a"]
    right.bar(names, [statistics.median(decode[n]) for n in names],
              color=[colors[i % len(colors)] for i in range(len(names))])
    right.set_ylabel("streamed decode tokens/s (median)")
    right.set_title("350M Q4_K_M, 128 tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return True


if __name__ == "__main__":
    main()
