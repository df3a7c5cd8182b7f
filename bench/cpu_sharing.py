"""How llama-servers that share the CPU decode under each OpenMP wait policy; writes
docs/cpu-sharing.md and .json.

One server alone, then two decoding at once, each with the default wait (GNU libgomp spins
at a barrier before it sleeps), OMP_WAIT_POLICY=PASSIVE (sleeps at once; what lalo sets when
its servers have more threads than the machine has CPUs) and GOMP_SPINCOUNT=1000 (a short
spin). The policies alternate round by round in one run; every server runs the same random-
weight 350M-parameter model with the same argv, threads left to llama.cpp.

    python bench/cpu_sharing.py [--rounds 5] [--tokens 64] [--server PATH]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from launcher.cpu_share import cpu_share, default_threads, usable_cpus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import ROOT, clean_environ, free_port, prepare

POLICIES: dict[str, dict[str, str]] = {
    "default": {},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
}
PROMPT = "hello " * 100


class Server:
    def __init__(self, binary: Path, model: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
             "--ctx-size", "2048", "--parallel", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**clean_environ(), **env})

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"llama-server exited with {self.process.returncode}")
                try:
                    if client.get(f"http://127.0.0.1:{self.port}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        raise RuntimeError("llama-server not ready in time")

    def generate(self, tokens: int) -> tuple[float, float]:
        """(prompt tokens/s, decode tokens/s) as the server timed them."""
        reply = httpx.post(
            f"http://127.0.0.1:{self.port}/completion",
            json={"prompt": PROMPT, "n_predict": tokens, "ignore_eos": True,
                  "cache_prompt": False, "temperature": 0},
            timeout=900, trust_env=False)
        reply.raise_for_status()
        timings = reply.json()["timings"]
        return float(timings["prompt_per_second"]), float(timings["predicted_per_second"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def measure(binary: Path, model: Path, servers: int, rounds: int, tokens: int
            ) -> dict[str, list[tuple[float, float]]]:
    """Per policy, (prompt t/s, decode t/s) of every server in every round; `servers` of
    each policy generate at once, and the policies take turns."""
    fleets = {name: [Server(binary, model, env) for _ in range(servers)]
              for name, env in POLICIES.items()}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in POLICIES}
    try:
        for fleet in fleets.values():
            for server in fleet:
                server.wait_ready()
        for fleet in fleets.values():  # one untimed pass: page cache and first-request work
            fleet[0].generate(8)
        with concurrent.futures.ThreadPoolExecutor(servers) as pool:
            for _ in range(rounds):
                for name, fleet in fleets.items():
                    results[name].extend(pool.map(lambda s: s.generate(tokens), fleet))
    finally:
        for fleet in fleets.values():
            for server in fleet:
                server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--server", type=Path)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lalo-startup")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    if args.server is None:
        from launcher.engines.registry import require_llama_server

        args.server = require_llama_server().path
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = prepare(args.workdir)[-1]  # the 350M-parameter shape
    started = time.monotonic()
    alone = measure(args.server, model, 1, args.rounds, args.tokens)
    two = measure(args.server, model, 2, max(2, args.rounds // 2), args.tokens)
    med = statistics.median

    def decode(values: list[tuple[float, float]]) -> float:
        return med(v[1] for v in values)

    def prompt(values: list[tuple[float, float]]) -> float:
        return med(v[0] for v in values)

    threads = default_threads()
    cpus = usable_cpus()
    summary: dict[str, Any] = {
        "model": f"{model.name} ({model.stat().st_size / 2**20:.0f} MiB, random weights)",
        "threads_per_server": threads, "cpus": cpus, "tokens": args.tokens,
        "lalo_sets_passive_for_two": cpu_share([None, None]).oversubscribed,
        "alone": {name: {"prompt_tps": prompt(v), "decode_tps": decode(v), "all": v}
                  for name, v in alone.items()},
        "two_at_once": {name: {"prompt_tps": prompt(v), "decode_tps": decode(v), "all": v}
                        for name, v in two.items()},
        "seconds": time.monotonic() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu-sharing.json").write_text(json.dumps(summary, indent=1) + "\n")
    base_alone = decode(alone["default"])
    base_two = decode(two["default"])
    lines = [
        "# Model servers sharing the CPU: OpenMP wait policies",
        "",
        "Made by `python bench/cpu_sharing.py` in one run: llama-servers on "
        f"{summary['model']}, {threads} compute threads each (llama.cpp's default: one per "
        f"physical core), on {cpus} CPUs. Each request: a 100-token prompt, then "
        f"{args.tokens} tokens decoded; tokens/s as llama-server timed them, median over "
        f"{len(alone['default'])} requests alone and {len(two['default'])} with two at once. "
        "The policies took turns round by round.",
        "",
        "| wait policy | alone: prompt t/s | alone: decode t/s | two at once: decode t/s each |",
        "|---|---:|---:|---:|",
    ]
    for name in POLICIES:
        lines.append(
            f"| {name} | {prompt(alone[name]):.0f} | {decode(alone[name]):.1f} "
            f"({decode(alone[name]) / base_alone:.2f}x) | {decode(two[name]):.1f} "
            f"({decode(two[name]) / base_two:.2f}x) |")
    lines += [
        "",
        "Per request, decode t/s alone: " + "; ".join(
            f"{name} " + ", ".join(f"{v[1]:.1f}" for v in values) for name, values in alone.items())
        + ". Two at once: " + "; ".join(
            f"{name} " + ", ".join(f"{v[1]:.1f}" for v in values) for name, values in two.items())
        + ".",
        "",
        "Why: llama.cpp's CPU backend (built with OpenMP, as `lalo engine build` and "
        "llama.cpp's own cmake default do) meets its threads at an OpenMP barrier after every "
        "step of a graph. GNU libgomp spins at a barrier before it sleeps. Alone, that is the "
        "fastest way to wait. When two servers have more threads than there are CPUs, a thread "
        "spins for a peer the scheduler has taken off the CPU, and every barrier costs a "
        "time slice. PASSIVE sleeps at once: a little slower alone, far faster shared. A short "
        "spin (GOMP_SPINCOUNT=1000, about 10 microseconds in libgomp) recovers less when "
        "shared; it is a GNU libgomp setting, while OMP_WAIT_POLICY is standard OpenMP that "
        "every runtime reads (a llama-server built with clang, llama-cpp-python's wheels), which "
        "is why lalo sets PASSIVE. Who prefers the short spin can set it in a model's `env:`.",
        "",
        "What lalo does (launcher/cpu_share.py): when the models of one config may run at once "
        "with more compute threads than the CPUs lalo may use (its affinity mask), it starts "
        "their servers with `OMP_WAIT_POLICY=PASSIVE`; a single model, `max_loaded: 1`, or "
        "threads that fit the CPUs keep the engine's default. A wait setting the user gave "
        "(OMP_WAIT_POLICY, GOMP_SPINCOUNT, KMP_BLOCKTIME or KMP_LIBRARY, in lalo's environment "
        "or a model's `env:`) is never overridden. `lalo plan` and `lalo up` say which applies. "
        "Loading is affected the same way: see docs/startup-benchmark.md (three servers "
        "starting at once).",
        "",
        f"Whole run: {summary['seconds']:.0f} s.",
    ]
    (args.out / "cpu-sharing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
