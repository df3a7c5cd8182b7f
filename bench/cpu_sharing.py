"""How llama-servers that share the CPU decode under each way their threads can wait; writes
docs/cpu-sharing.md and .json.

One, two and three servers decoding at once, each way in turn, round by round in one run; every
server runs the same random-weight 350M-parameter model with the same argv:
- OpenMP (the default build): the default wait (GNU libgomp spins at a barrier before it
  sleeps), OMP_WAIT_POLICY=PASSIVE (sleeps at once; what lalo sets when its servers have more
  threads than the machine has CPUs), and GOMP_SPINCOUNT levels (a bounded spin);
- ggml's own thread pool (a llama-server built with `-DGGML_OPENMP=OFF`, given with
  `--server-noomp`; rows skipped without it) at llama-server's `--poll` levels (0 = sleep at
  once, 50 = its default, 100 = spin);
- threads chosen from what is busy: `--threads max(1, CPUs / servers busy)` with the default
  wait, as lalo could choose if it knew how many models will decode at once.

    python bench/cpu_sharing.py [--rounds 5] [--tokens 64] [--servers 1,2,3]
                                [--ways default,PASSIVE,...] [--server PATH] [--server-noomp PATH]
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from launcher.placement.cpu_share import default_threads, usable_cpus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import ROOT, clean_environ, free_port, prepare

PROMPT = "hello " * 100


@dataclass(frozen=True)
class Way:
    """One way for a server's threads to wait: the build, its environment and flags."""

    label: str
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    noomp: bool = False  # needs the llama-server built without OpenMP
    threads_by_busy: bool = False  # --threads CPUs / servers at once

    def argv(self, servers: int, cpus: int) -> tuple[str, ...]:
        if self.threads_by_busy:
            return (*self.args, "--threads", str(max(1, cpus // servers)))
        return self.args


WAYS = [
    Way("default"),
    Way("PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}),
    Way("GOMP_SPINCOUNT=100000", {"GOMP_SPINCOUNT": "100000"}),
    Way("GOMP_SPINCOUNT=10000", {"GOMP_SPINCOUNT": "10000"}),
    Way("GOMP_SPINCOUNT=1000", {"GOMP_SPINCOUNT": "1000"}),
    Way("GOMP_SPINCOUNT=300", {"GOMP_SPINCOUNT": "300"}),
    Way("GOMP_SPINCOUNT=100", {"GOMP_SPINCOUNT": "100"}),
    # what lalo sets for servers that share too few CPUs: libgomp takes the spin count,
    # LLVM's libomp (which ignores GOMP_*) the passive policy
    Way("PASSIVE + GOMP_SPINCOUNT=300", {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "300"}),
    Way("threads = CPUs / busy", threads_by_busy=True),
    Way("threads = CPUs / busy + PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, threads_by_busy=True),
    Way("ggml pool --poll 0", args=("--poll", "0"), noomp=True),
    Way("ggml pool --poll 50", args=("--poll", "50"), noomp=True),
    Way("ggml pool --poll 100", args=("--poll", "100"), noomp=True),
]


class Server:
    def __init__(self, binary: Path, model: Path, env: dict[str, str],
                 args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
             "--ctx-size", "2048", "--parallel", "1", *args],
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


def measure(binaries: dict[bool, Path], model: Path, ways: list[Way], servers: int,
            rounds: int, tokens: int, cpus: int) -> dict[str, list[tuple[float, float]]]:
    """Per way, (prompt t/s, decode t/s) of every server in every round; the `servers` of one
    way generate at once, and the ways take turns (only one way's fleet runs at a time)."""
    results: dict[str, list[tuple[float, float]]] = {way.label: [] for way in ways}
    with concurrent.futures.ThreadPoolExecutor(servers) as pool:
        for _ in range(rounds):
            for way in ways:
                fleet = [Server(binaries[way.noomp], model, way.env, way.argv(servers, cpus))
                         for _ in range(servers)]
                try:
                    for server in fleet:
                        server.wait_ready()
                    fleet[0].generate(8)  # untimed: first-request work
                    results[way.label].extend(pool.map(lambda s: s.generate(tokens), fleet))
                finally:
                    for server in fleet:
                        server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--servers", default="1,2,3", help="fleet sizes, comma separated")
    parser.add_argument("--ways", default="", help="labels to run (default: all that can)")
    parser.add_argument("--server", type=Path)
    parser.add_argument("--server-noomp", type=Path,
                        help="a llama-server built with -DGGML_OPENMP=OFF (ggml pool rows)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lalo-startup")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    if args.server is None:
        from launcher.engines.registry import require_llama_server

        args.server = require_llama_server().path
    wanted = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = set(wanted) - {way.label for way in WAYS}
    if unknown:
        parser.error(f"unknown ways {sorted(unknown)}; known: {[w.label for w in WAYS]}")
    ways = [w for w in WAYS if (not wanted or w.label in wanted)
            and (not w.noomp or args.server_noomp is not None)]
    sizes = [int(n) for n in args.servers.split(",")]
    binaries = {False: args.server, True: args.server_noomp or args.server}
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = prepare(args.workdir)[-1]  # the 350M-parameter shape
    cpus = usable_cpus()
    started = time.monotonic()
    runs = {n: measure(binaries, model, ways, n, args.rounds, args.tokens, cpus) for n in sizes}
    med = statistics.median

    def decode(n: int, label: str) -> float:
        values = runs[n][label]
        return float(med(v[1] for v in values)) if values else float("nan")

    summary: dict[str, Any] = {
        "model": f"{model.name} ({model.stat().st_size / 2**20:.0f} MiB, random weights)",
        "default_threads": default_threads(), "cpus": cpus, "tokens": args.tokens,
        "rounds": args.rounds, "noomp_server": str(args.server_noomp or ""),
        "decode_tps": {str(n): {w.label: decode(n, w.label) for w in ways} for n in sizes},
        "all": {str(n): runs[n] for n in sizes},
    }
    spin_alone = decode(1, "default") if 1 in sizes and ways[0].label == "default" else None
    passive = {n: decode(n, "PASSIVE") for n in sizes if any(w.label == "PASSIVE" for w in ways)}
    header = "| way | " + " | ".join(
        "alone" if n == 1 else f"{n} at once (each)" for n in sizes) + " |"
    lines = [
        "# Model servers sharing the CPU: how their threads wait",
        "",
        f"Made by `python bench/cpu_sharing.py --rounds {args.rounds} --tokens {args.tokens} "
        f"--servers {args.servers}" + (f" --ways '{args.ways}'" if args.ways else "")
        + (" --server-noomp PATH" if args.server_noomp else "") + "` "
        f"in one run: llama-servers on {summary['model']}, {default_threads()} compute threads "
        f"each unless the row says otherwise, on {cpus} CPUs. Each request: a 100-token prompt, "
        f"then {args.tokens} tokens decoded; decode tokens/s as llama-server timed them, median "
        "per server over the rounds; the ways took turns round by round. In brackets: alone, "
        "against the OpenMP default (spin); at once, against PASSIVE at the same count. "
        "Target for a policy that gives both: alone >= 0.97x spin, at once >= 0.95x PASSIVE.",
        "",
        header,
        "|---|" + "---:|" * len(sizes),
    ]
    for way in ways:
        cells = []
        for n in sizes:
            value = decode(n, way.label)
            base = spin_alone if n == 1 else passive.get(n)
            ratio = f" ({value / base:.2f}x)" if base else ""
            cells.append(f"{value:.1f}{ratio}")
        lines.append(f"| {way.label} | " + " | ".join(cells) + " |")
    lines += ["", f"Whole run: {time.monotonic() - started:.0f} s."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu-sharing.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "cpu-sharing-table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
