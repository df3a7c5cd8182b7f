"""What one peer hop costs: a model asked of its llama-server directly, of the lalo that runs it
(B), and of a lalo that has no models and names B as its peer (A -> B), interleaved.

Measures, in one run (both lalos on loopback, B with an api key, as a peer would be):
  - time to first token on a tiny model: p50 / p99 per target, and what the hop adds (A->B - B)
  - streamed decode tokens/s on a 350M-shape Q4_K_M random-weight model: ratio A->B / B
Prints a markdown table (pasted into docs/deploy.md) and writes docs/peers-benchmark.json.

    python bench/peers.py [--samples 300] [--decode-rounds 20] [--server PATH]
    python bench/peers.py --samples 20 --decode-rounds 2      # a quick check that it runs
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
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy_overhead import (  # the sibling benchmark's helpers
    Target,
    child_key,
    free_port,
    percentile,
    prepare_models,
    stream_once,
    wait_http,
)

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-peer-key"


async def measure(tiny: list[Target], medium: list[Target], samples: int,
                  decode_rounds: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8, keepalive_expiry=3.0)
    ttft: dict[str, list[float]] = {t.name: [] for t in tiny}
    decode: dict[str, list[float]] = {t.name: [] for t in medium}
    async with httpx.AsyncClient(timeout=300, limits=limits, trust_env=False) as client:
        for target in tiny + medium:  # warm up: caches and connections on every hop
            await stream_once(client, target, 8)
        for round_number in range(samples):
            shift = round_number % len(tiny)  # nobody always runs right after another
            for target in tiny[shift:] + tiny[:shift]:
                first, _ = await stream_once(client, target, 1)
                ttft[target.name].append(first)
        for round_number in range(decode_rounds):
            shift = round_number % len(medium)
            for target in medium[shift:] + medium[:shift]:
                _, arrivals = await stream_once(client, target, 128)
                decode[target.name].append((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]))
    return {"ttft": ttft, "decode": decode}


def start_lalo(config: Path, port: int, state: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", "up", "--config", str(config), "--port", str(port)],
        env={**os.environ, **env, "LALO_STATE_DIR": str(state)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_peer_up(url: str) -> None:
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        peers = httpx.get(url + "/api/status", trust_env=False).json()["peers"]
        if peers and all(p["state"] == "up" and p["models"] for p in peers):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the peer never came up: {peers}")


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    ms = {name: [v * 1000 for v in values] for name, values in results["ttft"].items()}
    rows = {name: {"ttft_p50_ms": statistics.median(v), "ttft_p99_ms": percentile(v, 99),
                   "decode_tok_s": statistics.median(results["decode"][name])}
            for name, v in ms.items()}
    hop = [a - b for a, b in zip(ms["A -> B (peer)"], ms["B (local)"], strict=True)]
    return {
        "rows": rows,
        "hop_ttft_added_p50_ms": statistics.median(hop),
        "hop_ttft_added_p99_ms": rows["A -> B (peer)"]["ttft_p99_ms"] - rows["B (local)"]["ttft_p99_ms"],
        "decode_ratio_peer_vs_local": statistics.median(
            a / b for a, b in zip(results["decode"]["A -> B (peer)"],
                                  results["decode"]["B (local)"], strict=True)),
    }


def table(summary: dict[str, Any], samples: int, rounds: int) -> str:
    lines = ["| target | TTFT p50 | TTFT p99 | decode tok/s (median) |",
             "|---|---|---|---|"]
    for name, row in summary["rows"].items():
        lines.append(f"| {name} | {row['ttft_p50_ms']:.1f} ms | {row['ttft_p99_ms']:.1f} ms | "
                     f"{row['decode_tok_s']:.1f} |")
    lines.append("")
    lines.append(f"One peer hop adds {summary['hop_ttft_added_p50_ms']:.2f} ms to the time to "
                 f"first token (median of {samples} paired samples; p99 "
                 f"{summary['hop_ttft_added_p99_ms']:+.1f} ms); decode through the peer runs at "
                 f"{summary['decode_ratio_peer_vs_local']:.3f}x the local lalo's "
                 f"({rounds} rounds of 128 tokens).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300, help="time-to-first-token rounds")
    parser.add_argument("--decode-rounds", type=int, default=20)
    parser.add_argument("--server", type=Path)
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "lalo-bench-peers")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "peers-benchmark.json")
    args = parser.parse_args()
    if args.server is None:
        from launcher.engines.registry import require_llama_server

        args.server = require_llama_server().path
    args.workdir.mkdir(parents=True, exist_ok=True)
    tiny, medium = prepare_models(args.workdir, args.server)
    state = args.workdir / "state"
    shutil.rmtree(state, ignore_errors=True)
    port_b, port_a = free_port(), free_port()
    config_b = args.workdir / "b.yaml"
    config_b.write_text(yaml.safe_dump({
        "proxy": {"api_keys": [KEY]},
        "engines": {"llama_server": {"path": str(args.server)}},
        "models": {"tiny": {"file": str(tiny), "ctx_size": 4096, "parallel": 4},
                   "medium": {"file": str(medium), "ctx_size": 4096, "parallel": 4}},
    }))
    config_a = args.workdir / "a.yaml"
    config_a.write_text(yaml.safe_dump({"peers": {"b": {
        "url": f"http://127.0.0.1:{port_b}", "api_key_env": "BENCH_PEER_KEY"}}}))
    url_b, url_a = f"http://127.0.0.1:{port_b}", f"http://127.0.0.1:{port_a}"
    auth = {"Authorization": f"Bearer {KEY}"}
    lalos = [start_lalo(config_b, port_b, state / "b", {}),
             start_lalo(config_a, port_a, state / "a", {"BENCH_PEER_KEY": KEY})]
    try:
        wait_http(url_b + "/health")
        ready = _ready(url_b)
        wait_http(url_a + "/health")
        wait_peer_up(url_a)

        def targets(model: str) -> list[Target]:
            row = ready[model]
            return [Target("llama-server", f"http://127.0.0.1:{row['port']}", model,
                           {"Authorization": f"Bearer {child_key(row['pid'])}"}),
                    Target("B (local)", url_b, model, auth),
                    Target("A -> B (peer)", url_a, model)]

        results = asyncio.run(measure(targets("tiny"), targets("medium"), args.samples,
                                      args.decode_rounds))
    finally:
        for proc in lalos:
            proc.terminate()
        for proc in lalos:
            proc.wait(60)
    summary = summarise(results)
    args.out.write_text(json.dumps({"samples": args.samples, "decode_rounds": args.decode_rounds,
                                    **summary, "raw": results}, indent=1) + "\n")
    print(table(summary, args.samples, args.decode_rounds))


def _ready(url: str) -> dict[str, dict[str, Any]]:
    """Every model of B ready: its status rows by name (asked with B's key)."""
    import time

    deadline = time.monotonic() + 120
    while True:
        status = httpx.get(url + "/api/status", headers={"Authorization": f"Bearer {KEY}"},
                           trust_env=False).json()
        models = {m["name"]: m for m in status["models"]}
        if models and all(m["state"] == "ready" for m in models.values()):
            return models
        if time.monotonic() > deadline:
            raise RuntimeError(f"models not ready: {models}")
        time.sleep(0.2)


if __name__ == "__main__":
    main()
