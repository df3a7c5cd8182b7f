"""Decode speed of the engines lalo builds: native (tuned to this CPU) against portable (built
in the Debian 11 root, CPU variant picked at run time), on the same model, alternately.

Each round starts each engine's llama-server on the model (2 threads, 1 slot), asks for a
completion of --tokens tokens at temperature 0 (ignore_eos) and reads llama-server's own
`timings.predicted_per_second`; then stops it. The report gives medians and the portable /
native ratio: the tests can use the portable engine alone when it is within 5 %.

    python bench/engine_variants.py [--rounds 7] [--tokens 128] [--model smollm2|350m|PATH]
        [--out docs/engine-variants.json]

Engines come from lalo's cache (`lalo engine build` and `lalo engine build --variant
portable`). The default model is the real SmolLM2-135M (from its wheel); `350m` is a random-
weight model of a 350M shape (Q4_K_M is not made here: Q8_0).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from launcher.engines.registry import SERVER, cached_engines

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def engines() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path, manifest in cached_engines():
        if manifest.variant in ("native", "portable") and manifest.variant not in found:
            found[manifest.variant] = path / "bin" / SERVER
    missing = {"native", "portable"} - set(found)
    if missing:
        sys.exit(f"not built: {', '.join(sorted(missing))} (lalo engine build --variant ...)")
    return found


def model_path(choice: str, workdir: Path) -> Path:
    if choice == "smollm2":
        root = Path(__file__).resolve().parent.parent
        sys.path.insert(0, str(root))
        from tests.support.real_models import real_model

        return real_model("smollm2-135m-instruct")
    if choice == "350m":
        from launcher.models.synthetic import SHAPES, write_synthetic_model

        path = workdir / "bench-350m-q8.gguf"
        if not path.exists():
            write_synthetic_model(path, SHAPES["llama-350m"], tensor_type="Q8_0", seed=1,
                                  name="bench 350m (random weights)")
        return path
    return Path(choice)


def one_round(server: Path, model: Path, tokens: int, threads: int) -> dict[str, Any]:
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
         "-t", str(threads), "-np", "1", "-c", "2048"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "LD_LIBRARY_PATH": ""},
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False,
                          timeout=300) as client:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    sys.exit(f"{server} exited:\n{log.read().decode(errors='replace')[-2000:]}")
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    sys.exit(f"{server} not healthy after 120 s")
                time.sleep(0.1)
            body = {"prompt": PROMPT, "n_predict": tokens, "temperature": 0,
                    "ignore_eos": True, "cache_prompt": False}
            client.post("/completion", json={**body, "n_predict": 8})  # warm-up
            timings = client.post("/completion", json=body).json()["timings"]
        return {"decode_tps": timings["predicted_per_second"],
                "prompt_tps": timings["prompt_per_second"]}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    found = engines()
    with tempfile.TemporaryDirectory() as tmp:
        model = model_path(args.model, Path(tmp))
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in found}
        for index in range(args.rounds):
            order = sorted(found) if index % 2 == 0 else sorted(found, reverse=True)
            for name in order:
                result = one_round(found[name], model, args.tokens, args.threads)
                results[name].append(result)
                print(f"round {index + 1} {name}: {result['decode_tps']:.1f} tok/s decode",
                      flush=True)
    medians = {name: statistics.median(r["decode_tps"] for r in rows)
               for name, rows in results.items()}
    ratio = medians["portable"] / medians["native"]
    report = {"model": str(model), "tokens": args.tokens, "threads": args.threads,
              "rounds": args.rounds, "median_decode_tps": medians,
              "portable_over_native": round(ratio, 3), "within_5_percent": ratio >= 0.95,
              "engines": {k: str(v) for k, v in found.items()}, "runs": results}
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
