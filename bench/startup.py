"""Time from `lalo up` to all models ready vs starting the same llama-servers by hand; lalo's RSS.

Runs the two ways alternately (--rounds times each) in one run, on generated random-weight
models, and writes docs/startup-benchmark.md and .json.

    python bench/startup.py [--rounds 5] [--server PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from launcher.models.synthetic import SHAPES, write_synthetic_model

ROOT = Path(__file__).resolve().parent.parent
MODELS = [("demo-a", "demo", 1), ("demo-b", "demo", 2), ("small-350m", "llama-350m", 3)]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare(workdir: Path) -> list[Path]:
    paths = []
    for name, shape, seed in MODELS:
        path = workdir / f"{name}.gguf"
        if not path.exists():
            write_synthetic_model(path, SHAPES[shape], tensor_type="Q8_0", seed=seed,
                                  name=f"bench {name} (random weights)")
        paths.append(path)
    return paths


def by_hand(server: Path, models: list[Path]) -> float:
    """Start each llama-server in parallel, poll each /health until all answer 200."""
    started = time.perf_counter()
    procs = []
    ports = []
    for model in models:
        port = free_port()
        ports.append(port)
        procs.append(subprocess.Popen(
            [str(server), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
             "--ctx-size", "2048", "--parallel", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    try:
        pending = set(ports)
        with httpx.Client(trust_env=False) as client:
            while pending:
                for port in list(pending):
                    try:
                        if client.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                            pending.discard(port)
                    except httpx.HTTPError:
                        pass
                time.sleep(0.01)
        return time.perf_counter() - started
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def with_lalo(config: Path, state: Path) -> tuple[float, float, int]:
    """`lalo up` until /api/status shows every model ready; also the time until it started
    its first model server (Python start-up, imports, config, GGUF headers, plan) and lalo's
    own RSS once all are ready."""
    shutil.rmtree(state, ignore_errors=True)
    port = free_port()
    env = {**os.environ, "LALO_STATE_DIR": str(state)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "up", "--config", str(config),
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/api/status"
        with httpx.Client(trust_env=False) as client:
            while True:
                try:
                    models = client.get(url, timeout=1).json()["models"]
                    if models and all(m["state"] == "ready" for m in models):
                        break
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(f"lalo up exited with {proc.returncode}")
                time.sleep(0.01)
        elapsed = time.perf_counter() - started
        me = psutil.Process(proc.pid)
        first_spawn = min(child.create_time() for child in me.children()) - me.create_time()
        time.sleep(3)  # let it settle (health checks, first status requests) before reading RSS
        rss = int(psutil.Process(proc.pid).memory_info().rss)
        return elapsed, first_spawn, rss
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--server", type=Path)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lalo-startup")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    if args.server is None:
        from launcher.engines.registry import require_llama_server

        args.server = require_llama_server().path
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = prepare(args.workdir)
    config = args.workdir / "lalo.yaml"
    config.write_text(yaml.safe_dump({
        "engines": {"llama_server": {"path": str(args.server)}},
        "models": {p.stem: {"file": str(p), "ctx_size": 2048} for p in models},
    }))
    hand: list[float] = []
    lalo: list[float] = []
    spawn: list[float] = []
    rss: list[int] = []
    by_hand(args.server, models)  # warm the page cache for both
    for _ in range(args.rounds):
        hand.append(by_hand(args.server, models))
        seconds, first_spawn, memory = with_lalo(config, args.workdir / "state")
        lalo.append(seconds)
        spawn.append(first_spawn)
        rss.append(memory)
    summary: dict[str, Any] = {
        "models": [f"{p.name} ({p.stat().st_size / 2**20:.0f} MiB)" for p in models],
        "rounds": args.rounds,
        "by_hand_s": hand,
        "lalo_s": lalo,
        "by_hand_median_s": statistics.median(hand),
        "lalo_median_s": statistics.median(lalo),
        "added_median_s": statistics.median(lalo) - statistics.median(hand),
        "ratio": statistics.median(lalo) / statistics.median(hand),
        "lalo_first_spawn_s": spawn,
        "lalo_first_spawn_median_s": statistics.median(spawn),
        "lalo_rss_bytes": rss,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup-benchmark.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        "# Start-up: `lalo up` to all ready vs the same llama-servers started by hand",
        "",
        "Made by `python bench/startup.py` in one run, alternating the two ways "
        f"({args.rounds} rounds each, page cache warm). Models (random weights): "
        + ", ".join(summary["models"]) + ". By hand = start the three llama-servers in parallel "
        "and poll each `/health` every 10 ms; lalo = from running `lalo up` (a new Python "
        "process: imports, config, GGUF headers, plan) until `/api/status` says every model is ready.",
        "",
        "| | median | all rounds |",
        "|---|---:|---|",
        f"| by hand | {summary['by_hand_median_s']:.2f} s | "
        + ", ".join(f"{v:.2f}" for v in hand) + " |",
        f"| lalo up | {summary['lalo_median_s']:.2f} s | " + ", ".join(f"{v:.2f}" for v in lalo) + " |",
        "",
        f"Added by lalo: **{summary['added_median_s']:+.2f} s** (median; ratio "
        f"{summary['ratio']:.2f}; target: at most 0.5 s added).",
        "",
        f"lalo's first model server starts **{summary['lalo_first_spawn_median_s']:.2f} s** "
        "(median; " + ", ".join(f"{v:.2f}" for v in spawn) + ") after `lalo up` was run: "
        "Python start-up, imports, config, GGUF headers, plan. The proxy stack is imported and "
        "started while the servers load; on a small machine (this one has 2 cores for three "
        "servers of 2 threads each) what lalo does meanwhile takes CPU from them, which is "
        "why rounds vary so much.",
        "",
        f"lalo's own RSS with three models ready (the supervisor and proxy process, children "
        f"not counted): **{statistics.median(rss) / 2**20:.0f} MiB** (median; target <= 60 MB).",
    ]
    (args.out / "startup-benchmark.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
