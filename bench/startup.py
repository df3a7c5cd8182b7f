"""Time from `lalo up` to all models ready vs starting the same llama-servers by hand; lalo's RSS.

Runs the three ways (by hand with lalo's server environment, lalo, by hand with the
default environment) alternately (--rounds times each) in one run, on generated random-weight
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
from launcher.placement.cpu_share import WAIT_SETTINGS, cpu_share, wait_env

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


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def clean_environ() -> dict[str, str]:
    """This process's environment without OpenMP wait settings: each way below sets its own."""
    return {k: v for k, v in os.environ.items() if k not in WAIT_SETTINGS}


def by_hand(server: Path, models: list[Path], env: dict[str, str]) -> tuple[float, float]:
    """Start each llama-server in parallel with `env` added to the environment, poll each
    /health until all answer 200; the seconds that took and the CPU seconds the servers
    used meanwhile."""
    started = time.perf_counter()
    procs = []
    ports = []
    for model in models:
        port = free_port()
        ports.append(port)
        procs.append(subprocess.Popen(
            [str(server), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
             "--ctx-size", "2048", "--parallel", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**clean_environ(), **env}))
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
        elapsed = time.perf_counter() - started
        return elapsed, cpu_seconds([psutil.Process(p.pid) for p in procs])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def with_lalo(config: Path, state: Path) -> tuple[float, float, int, float, float]:
    """`lalo up` until /api/status shows every model ready; also the time until it started
    its first model server (Python start-up, imports, config, GGUF headers, plan), lalo's
    own RSS once all are ready, and the CPU seconds lalo (after that first spawn) and its
    servers used until then."""
    shutil.rmtree(state, ignore_errors=True)
    port = free_port()
    env = {**clean_environ(), "LALO_STATE_DIR": str(state)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "up", "--config", str(config),
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    me = psutil.Process(proc.pid)
    cpu_at_spawn: float | None = None
    try:
        url = f"http://127.0.0.1:{port}/api/status"
        with httpx.Client(trust_env=False) as client:
            while True:
                if cpu_at_spawn is None and me.children():
                    cpu_at_spawn = cpu_seconds([me])
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
        servers_cpu = cpu_seconds(me.children())
        lalo_cpu = cpu_seconds([me]) - (cpu_at_spawn or 0.0)
        first_spawn = min(child.create_time() for child in me.children()) - me.create_time()
        time.sleep(3)  # let it settle (health checks, first status requests) before reading RSS
        rss = int(psutil.Process(proc.pid).memory_info().rss)
        return elapsed, first_spawn, rss, lalo_cpu, servers_cpu
    finally:
        proc.terminate()
        proc.wait(60)


# What `lalo up` imports before its first model server starts that is not lalo's own code: the
# libraries issue 2 chose that `up` needs (pydantic v2 with one validated model, PyYAML, psutil,
# platformdirs) and asyncio, with pydantic's plugin scan off as lalo has it. typer is not on
# the path: launcher.cli.main parses plain `lalo up` command lines itself.
LIBRARIES = (
    "import os\nos.environ.setdefault('PYDANTIC_DISABLE_PLUGINS', '__all__')\n"
    "import asyncio, platformdirs, psutil, yaml\n"
    "from pydantic import BaseModel, Field\n"
    "class Probe(BaseModel):\n    x: int = Field(1, ge=0)\n"
    "Probe(x=2)\n"
)
IMPORTS = {
    "python": "pass",
    "libraries": LIBRARIES,
    "lalo": "import launcher.cli.main, launcher.cli.up",
}


def import_costs(rounds: int) -> dict[str, float]:
    """Median wall time of a new Python process that imports each set (interleaved)."""
    times: dict[str, list[float]] = {name: [] for name in IMPORTS}
    for _ in range(rounds):
        for name, code in IMPORTS.items():
            started = time.perf_counter()
            # os._exit: the interpreter's teardown at exit is not part of start-up
            subprocess.run([sys.executable, "-c", code + "\nimport os; os._exit(0)"],
                           check=True)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


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
    # lalo's bytecode, as pip writes it when it installs a package and Python on a first run
    # (an editable install under PYTHONDONTWRITEBYTECODE=1 would otherwise compile each time)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "launcher")], check=True,
                   stdout=subprocess.DEVNULL)
    models = prepare(args.workdir)
    config = args.workdir / "lalo.yaml"
    config.write_text(yaml.safe_dump({
        "engines": {"llama_server": {"path": str(args.server)}},
        "models": {p.stem: {"file": str(p), "ctx_size": 2048} for p in models},
    }))
    # the environment lalo gives these servers (this machine's CPUs, three models, threads auto)
    share = cpu_share([None] * len(models))
    lalo_env = wait_env(share, {}, environ={})
    hand: list[float] = []
    hand_cpu: list[float] = []
    plain: list[float] = []
    plain_cpu: list[float] = []
    lalo: list[float] = []
    spawn: list[float] = []
    rss: list[int] = []
    lalo_cpu: list[float] = []
    servers_cpu: list[float] = []
    by_hand(args.server, models, lalo_env)  # warm the page cache for all
    for _ in range(args.rounds):
        seconds, cpu = by_hand(args.server, models, lalo_env)
        hand.append(seconds)
        hand_cpu.append(cpu)
        seconds, cpu = by_hand(args.server, models, {})
        plain.append(seconds)
        plain_cpu.append(cpu)
        seconds, first_spawn, memory, own, children = with_lalo(config, args.workdir / "state")
        lalo.append(seconds)
        spawn.append(first_spawn)
        rss.append(memory)
        lalo_cpu.append(own)
        servers_cpu.append(children)
    imports = import_costs(max(args.rounds, 9))
    med = statistics.median
    summary: dict[str, Any] = {
        "models": [f"{p.name} ({p.stat().st_size / 2**20:.0f} MiB)" for p in models],
        "rounds": args.rounds,
        "cpu_share": {"servers": share.servers, "threads": share.threads, "cpus": share.cpus},
        "server_env": lalo_env,
        "by_hand_s": hand,
        "by_hand_default_env_s": plain,
        "lalo_s": lalo,
        "by_hand_median_s": med(hand),
        "by_hand_default_env_median_s": med(plain),
        "lalo_median_s": med(lalo),
        "added_median_s": med(lalo) - med(hand),
        "ratio": med(lalo) / med(hand),
        "added_vs_default_env_median_s": med(lalo) - med(plain),
        "lalo_first_spawn_s": spawn,
        "lalo_first_spawn_median_s": med(spawn),
        "lalo_rss_bytes": rss,
        "import_median_s": imports,
        "by_hand_servers_cpu_s": hand_cpu,
        "by_hand_default_env_servers_cpu_s": plain_cpu,
        "lalo_after_spawn_cpu_s": lalo_cpu,
        "lalo_servers_cpu_s": servers_cpu,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup-benchmark.json").write_text(json.dumps(summary, indent=1) + "\n")
    env_text = " ".join(f"{k}={v}" for k, v in lalo_env.items()) or "nothing"
    lines = [
        "# Start-up: `lalo up` to all ready vs the same llama-servers started by hand",
        "",
        "Made by `python bench/startup.py` in one run, alternating the three ways "
        f"({args.rounds} rounds each, page cache warm, lalo's package byte-compiled as pip "
        "installs it). Models (random weights): "
        + ", ".join(summary["models"]) + ". By hand = start the three llama-servers in parallel "
        "and poll each `/health` every 10 ms; lalo = from running `lalo up` (a new Python "
        "process: imports, config, GGUF headers, plan) until `/api/status` says every model is ready.",
        "",
        f"On this machine ({share.describe()}) lalo adds `{env_text}` to these servers' "
        "environment (docs/cpu-sharing.md). \"By hand\" starts them with the same argv and "
        "that same environment, so the difference is what lalo itself adds; \"by hand, default "
        "environment\" is what a user typing the three commands would get.",
        "",
        "| | median | all rounds |",
        "|---|---:|---|",
        f"| by hand | {med(hand):.2f} s | " + ", ".join(f"{v:.2f}" for v in hand) + " |",
        f"| lalo up | {med(lalo):.2f} s | " + ", ".join(f"{v:.2f}" for v in lalo) + " |",
        f"| by hand, default environment | {med(plain):.2f} s | "
        + ", ".join(f"{v:.2f}" for v in plain) + " |",
        "",
        f"Added by lalo: **{summary['added_median_s']:+.2f} s** (median; ratio "
        f"{summary['ratio']:.2f}; target: at most 0.5 s added). Against the default "
        f"environment by hand: {summary['added_vs_default_env_median_s']:+.2f} s.",
        "",
        f"lalo's first model server starts **{med(spawn):.2f} s** "
        "(median; " + ", ".join(f"{v:.2f}" for v in spawn) + ") after `lalo up` was run: "
        "Python start-up, imports, config, GGUF headers, plan. The proxy stack is imported and "
        "started while the servers load.",
        "",
        "Where the time before the first spawn goes (new Python processes that only import, "
        f"median of {max(args.rounds, 9)} interleaved runs): starting Python "
        f"{imports['python']:.2f} s; Python plus the libraries `lalo up` is built on (pydantic v2 "
        f"with one model, PyYAML, psutil, platformdirs, asyncio) {imports['libraries']:.2f} s; "
        f"Python plus all `lalo up` imports {imports['lalo']:.2f} s, so lalo's own modules add "
        f"{imports['lalo'] - imports['libraries']:.2f} s. The rest before the first spawn is "
        "reading the config and the GGUF headers and making the plan. typer is not imported: "
        "`lalo up` command lines are parsed without it (launcher/cli/main.py), as is "
        "pydantic's scan of installed distributions for plugins.",
        "",
        "CPU the three servers used until all were ready (median): by hand "
        f"{med(hand_cpu):.2f} s, under lalo {med(servers_cpu):.2f} s, by hand with the default "
        f"environment {med(plain_cpu):.2f} s; lalo itself used {med(lalo_cpu):.2f} s after its "
        "first spawn (the proxy stack: starlette, uvicorn, prometheus_client). Per round, by "
        "hand: " + ", ".join(f"{v:.2f}" for v in hand_cpu) + "; under lalo: "
        + ", ".join(f"{v:.2f}" for v in servers_cpu) + "; default environment: "
        + ", ".join(f"{v:.2f}" for v in plain_cpu) + ".",
        "",
        "Why the default environment costs more: llama.cpp's CPU backend waits at an OpenMP "
        "barrier after every step of a graph, and GNU libgomp spins there before it sleeps. "
        "Three servers loading at once have 6 such threads on 2 cores, so a thread spins for a "
        "peer that is not on a CPU, and anything else that runs meanwhile (lalo importing its "
        "proxy, a probe) makes that worse. That was the bimodal server CPU (0.7-1.3 s or about "
        "0.9 s more) recorded here before lalo set the wait policy.",
        "",
        f"lalo's own RSS with three models ready (the supervisor and proxy process, children "
        f"not counted): **{med(rss) / 2**20:.0f} MiB** (median; target <= 60 MB).",
    ]
    (args.out / "startup-benchmark.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
