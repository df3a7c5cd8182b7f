"""What lalo's llama.cpp patch 0002 (`POST /threads`) gives llama-servers that share this
machine's CPUs; writes docs/threads-route.json (quoted in docs/upstream/0002-*.md).

Two pairs of llama-servers on SmolLM2 (the real model), all started with `--threads` = the CPUs
lalo may use: one pair with OpenMP's default wait (spin), one with the wait lalo sets today for
servers that share too few CPUs (`GOMP_SPINCOUNT=300 OMP_WAIT_POLICY=PASSIVE`). Each round, in
turns: one server decoding alone at 1 thread and at the start's count (set with the route), both
of a pair decoding at once at the start's count, and both at once after the route set each to
CPUs / 2. Decode tokens/s as llama-server timed them, median over the rounds. Also the time
`POST /threads` takes to answer, idle and while the server streams a completion.

    python bench/threads_route.py [--rounds 5] [--tokens 128] [--server PATH]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from launcher.placement.cpu_share import SHARED_WAIT, usable_cpus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import ROOT, clean_environ, free_port

PROMPT = "The history of the bicycle begins in"


class Server:
    def __init__(self, binary: Path, model: Path, env: dict[str, str], threads: int) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        self.process = subprocess.Popen(
            [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", port,
             "--ctx-size", "2048", "--parallel", "1", "--threads", str(threads)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**clean_environ(), **env})
        self.client = httpx.Client(base_url=self.url, timeout=900, trust_env=False)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}")
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("llama-server not ready in time")

    def set_threads(self, n_threads: int) -> float:
        """Seconds until the answer."""
        started = time.perf_counter()
        reply = self.client.post("/threads", json={"n_threads": n_threads})
        elapsed = time.perf_counter() - started
        reply.raise_for_status()
        if reply.json()["n_threads"] != n_threads:
            raise RuntimeError(f"asked for {n_threads} threads, got {reply.json()}")
        return elapsed

    def decode(self, tokens: int) -> float:
        reply = self.client.post("/completion", json={
            "prompt": PROMPT, "n_predict": tokens, "ignore_eos": True, "cache_prompt": False,
            "temperature": 0})
        reply.raise_for_status()
        return float(reply.json()["timings"]["predicted_per_second"])

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(30)


def others_busy(started: Any, ended: Any, wall: float, mine: float) -> float:
    """CPUs that processes other than this run's used over `wall` seconds."""
    def busy(times: Any) -> float:
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))
    return max(0.0, busy(ended) - busy(started) - mine) / wall


def switch_times(server: Server, counts: tuple[int, int], streaming: bool) -> list[float]:
    """Ten POST /threads, alternating `counts`, idle or while a long stream decodes."""
    stream_done = threading.Event()

    def stream() -> None:
        with server.client.stream("POST", "/completion", json={
                "prompt": PROMPT, "n_predict": 512, "ignore_eos": True, "stream": True,
                "temperature": 0}) as reply:
            for _ in reply.iter_lines():
                pass
        stream_done.set()

    worker = threading.Thread(target=stream) if streaming else None
    if worker is not None:
        worker.start()
        time.sleep(0.5)  # the stream is decoding
    with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as other:
        times = []
        for i in range(10):
            started = time.perf_counter()
            other.post("/threads", json={"n_threads": counts[i % 2]}).raise_for_status()
            times.append(time.perf_counter() - started)
    if worker is not None:
        still_streaming = not stream_done.is_set()
        worker.join()
        if not still_streaming:
            raise RuntimeError("the stream ended before the changes: use a slower setting")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--server", type=Path, help="a llama-server with patch 0002")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "threads-route.json")
    args = parser.parse_args()
    if args.server is None:
        from launcher.engines.registry import require_llama_server

        args.server = require_llama_server().path
    from tests.support.real_models import real_model

    model = real_model("smollm2-135m-instruct")
    cpus = usable_cpus()
    half = max(1, cpus // 2)
    pairs = {"spin": [Server(args.server, model, {}, cpus) for _ in range(2)],
             "lalo wait": [Server(args.server, model, dict(SHARED_WAIT), cpus) for _ in range(2)]}
    everyone = [s for pair in pairs.values() for s in pair]
    cases: dict[str, list[float]] = {}
    load: list[float] = []

    def record(label: str, values: list[float]) -> None:
        cases.setdefault(label, []).extend(values)

    me = psutil.Process()
    run_started = time.monotonic()
    try:
        for server in everyone:
            server.wait_ready()
            server.decode(8)  # untimed: first-request work
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for _ in range(args.rounds):
                for wait, (first, second) in pairs.items():
                    busy_before, mine_before = psutil.cpu_times(), me.cpu_times()
                    round_started = time.monotonic()
                    servers_cpu = sum(_cpu(s) for s in everyone)
                    for count in (1, cpus):
                        first.set_threads(count)
                        record(f"alone, {wait}, {count} thread(s)", [first.decode(args.tokens)])
                    record(f"2 at once, {wait}, {cpus} threads each",
                           list(pool.map(lambda s: s.decode(args.tokens), (first, second))))
                    for server in (first, second):
                        server.set_threads(half)
                    record(f"2 at once, {wait}, {half} thread(s) each (set with the route)",
                           list(pool.map(lambda s: s.decode(args.tokens), (first, second))))
                    for server in (first, second):
                        server.set_threads(cpus)
                    mine = (sum(me.cpu_times()[:2]) - sum(mine_before[:2])
                            + sum(_cpu(s) for s in everyone) - servers_cpu)
                    load.append(others_busy(busy_before, psutil.cpu_times(),
                                            time.monotonic() - round_started, mine))
        spin = pairs["spin"][0]
        switch = {"idle": switch_times(spin, (1, cpus), streaming=False),
                  "while a stream decodes": switch_times(spin, (1, cpus), streaming=True)}
    finally:
        for server in everyone:
            server.stop()
    med = statistics.median
    summary = {
        "model": f"{model.name} ({model.stat().st_size / 2**20:.0f} MiB)", "cpus": cpus,
        "tokens": args.tokens, "rounds": args.rounds, "server": str(args.server),
        "seconds": round(time.monotonic() - run_started),
        "decode_tps_median": {label: round(med(v), 1) for label, v in cases.items()},
        "switch_ms_median": {label: round(1000 * med(v), 2) for label, v in switch.items()},
        "others_cpus_per_round": [round(x, 2) for x in load],
        "all": {"decode_tps": cases, "switch_s": switch},
    }
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    for label, value in summary["decode_tps_median"].items():
        print(f"{label:60s} {value:7.1f} tok/s")
    for label, value in summary["switch_ms_median"].items():
        print(f"POST /threads, {label:45s} {value:7.2f} ms")
    print(f"other processes used up to {max(load):.2f} CPUs per round; wrote {args.out}")


def _cpu(server: Server) -> float:
    try:
        times = psutil.Process(server.process.pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system + times.children_user + times.children_system)


if __name__ == "__main__":
    main()
