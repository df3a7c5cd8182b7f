"""Scheduling when models do not all fit: lalo (`max_loaded: 1`) vs llama.cpp's router
(`--models-max 1`), same llama-server binary, same two real models (SmolLM2-135M-Instruct and
Gemma 3 270M), measured in one run:

  - burst: N requests at once, half per model: total time, errors, swaps (lalo)
  - alternating: 8 requests A,B,A,B one after another: total time
  - cold: time to first token of a request for the model that is not loaded

Writes docs/scheduling-benchmark.md and .json (docs/scheduling.md explains the behaviour).

    python bench/scheduling.py [--burst 16] [--rounds 3] [--tokens 32] [--server PATH]
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
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.proxy_overhead import free_port, parent_death_signal, wait_http  # noqa: E402


def start_router(server: Path, models_dir: Path, port: int,
                 log: Path) -> subprocess.Popen[bytes]:
    """llama.cpp's router over the same files, one model in memory at a time; its log kept
    (it says when it starts a model: the router's swaps are counted there)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(server), "--models-dir", str(models_dir), "--host", "127.0.0.1", "--port",
             str(port), "-c", "2048", "-np", "4", "--models-max", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=parent_death_signal)


def router_loads(log: Path) -> int:
    """Model servers the router has started so far (each start after the first is a swap)."""
    return log.read_bytes().count(b"spawning server instance with name=")


def real_models() -> dict[str, Path]:
    from tests.support.real_models import real_model

    return {"smol": real_model("smollm2-135m-instruct"), "gemma": real_model("gemma-3-270m")}


ERRORS: dict[str, int] = {}  # what the answers that were not 200 said, and how often


async def one(client: httpx.AsyncClient, url: str, model: str, tokens: int,
              stream: bool = False) -> tuple[int, float, float]:
    """(status, time to first byte of the answer, total time) of one completion."""
    began = time.perf_counter()
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": tokens,
            "temperature": 0, "stream": stream}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            first = None
            content = b""
            async for piece in response.aiter_bytes():
                if first is None:
                    first = time.perf_counter() - began
                if response.status_code != 200:
                    content += piece
            if response.status_code != 200:
                said = f"{url.rsplit(':', 1)[-1]} {model}: {response.status_code} " \
                    f"{content[:300].decode('utf-8', 'replace')}"
                ERRORS[said] = ERRORS.get(said, 0) + 1
            return response.status_code, first or 0.0, time.perf_counter() - began
    except httpx.HTTPError as exc:
        said = f"{model}: {type(exc).__name__} {exc}"
        ERRORS[said] = ERRORS.get(said, 0) + 1
        return 599, 0.0, time.perf_counter() - began


async def scenario(url: str, names: dict[str, str], burst: int, tokens: int,
                   router_log: Path | None = None) -> dict[str, Any]:
    a, b = names["smol"], names["gemma"]

    async def swaps(client: httpx.AsyncClient) -> int:
        if router_log is not None:
            return router_loads(router_log)
        return await lalo_swaps(client, url)

    async with httpx.AsyncClient(timeout=600, trust_env=False,
                                 limits=httpx.Limits(max_connections=burst + 4)) as client:
        await one(client, url, a, 4)  # a loaded, b not
        cold = await one(client, url, b, tokens, stream=True)
        cold_ttft = cold[1]
        await one(client, url, a, 4)
        swaps_before = await swaps(client)
        began = time.perf_counter()
        results = await asyncio.gather(*(one(client, url, (a, b)[i % 2], tokens)
                                         for i in range(burst)))
        burst_s = time.perf_counter() - began
        burst_swaps = await swaps(client) - swaps_before
        burst_errors = sum(1 for status, _, _ in results if status != 200)
        began = time.perf_counter()
        alternating_errors = 0
        swaps_before = await swaps(client)
        for i in range(8):
            status, _, _ = await one(client, url, (a, b)[i % 2], tokens)
            alternating_errors += status != 200
        alternating_s = time.perf_counter() - began
        alternating_swaps = await swaps(client) - swaps_before
    return {"burst_s": burst_s, "burst_errors": burst_errors, "burst_swaps": burst_swaps,
            "alternating_s": alternating_s, "alternating_swaps": alternating_swaps,
            "alternating_errors": alternating_errors, "cold_ttft_s": cold_ttft,
            "cold_status": cold[0]}


async def lalo_swaps(client: httpx.AsyncClient, url: str) -> int:
    """Models lalo unloaded to make room so far (-1: not lalo)."""
    response = await client.get(url + "/api/status")
    if response.status_code != 200:
        return -1
    return sum(int(m.get("evictions") or 0) for m in response.json()["models"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--server", type=Path)
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "lalo-bench-scheduling")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    if args.server is None:
        from launcher.engines.registry import require_llama_server

        args.server = require_llama_server().path
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = real_models()
    models_dir = args.workdir / "router-models"
    shutil.rmtree(models_dir, ignore_errors=True)
    models_dir.mkdir()
    for path in models.values():
        (models_dir / path.name).symlink_to(path)
    router_names = {name: path.stem for name, path in models.items()}

    runs: dict[str, list[dict[str, Any]]] = {"lalo": [], "router": []}
    for _ in range(args.rounds):
        # lalo
        state = args.workdir / "state"
        shutil.rmtree(state, ignore_errors=True)
        config = args.workdir / "lalo.yaml"
        config.write_text(yaml.safe_dump({
            "engines": {"llama_server": {"path": str(args.server)}},
            "resources": {"max_loaded": 1},
            "models": {name: {"file": str(path), "ctx_size": 2048, "parallel": 4,
                              "preload": name == "smol"} for name, path in models.items()},
        }))
        port = free_port()
        env = {**os.environ, "LALO_STATE_DIR": str(state)}
        lalo = subprocess.Popen([sys.executable, "-m", "launcher", "up", "--config", str(config),
                                 "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/health")
            runs["lalo"].append(asyncio.run(scenario(url, {n: n for n in models}, args.burst,
                                                     args.tokens)))
        finally:
            lalo.terminate()
            lalo.wait(60)
        # llama.cpp's router
        router_port = free_port()
        router_log = args.workdir / f"router-{len(runs['router'])}.log"
        router = start_router(args.server, models_dir, router_port, router_log)
        try:
            url = f"http://127.0.0.1:{router_port}"
            wait_http(url + "/health")
            runs["router"].append(asyncio.run(scenario(url, router_names, args.burst,
                                                       args.tokens, router_log)))
        finally:
            os.killpg(router.pid, 15)
            router.wait(30)
    report(runs, args)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def report(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    summary: dict[str, dict[str, float]] = {}
    for name, results in runs.items():
        summary[name] = {key: statistics.median(float(r[key]) for r in results)
                         for key in results[0]}
        summary[name]["burst_errors_total"] = sum(r["burst_errors"] for r in results)
    lalo, router = summary["lalo"], summary["router"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scheduling-benchmark.json").write_text(json.dumps({"runs": runs, "summary": summary,
                                                          "burst": args.burst,
                                                          "tokens": args.tokens}, indent=2))
    lines = [
        "# Scheduling: two models, one place in memory",
        "",
        f"`python bench/scheduling.py --burst {args.burst} --rounds {args.rounds} "
        f"--tokens {args.tokens}`. Same llama-server binary, the real SmolLM2-135M-Instruct "
        "and Gemma 3 270M, one model in memory at a time (lalo `max_loaded: 1`, llama.cpp's "
        "router `--models-max 1`), 4 slots each, medians of the rounds.",
        "",
        "| | lalo | router | lalo / router |",
        "|---|---:|---:|---:|",
        f"| {args.burst} requests at once (half per model): total s | {lalo['burst_s']:.2f} | "
        f"{router['burst_s']:.2f} | {ratio(lalo['burst_s'], router['burst_s'])} |",
        f"| ... errors (all rounds) | {lalo['burst_errors_total']:.0f} | "
        f"{router['burst_errors_total']:.0f} | |",
        f"| 8 requests A,B,A,B one after another: total s | {lalo['alternating_s']:.2f} | "
        f"{router['alternating_s']:.2f} | {ratio(lalo['alternating_s'], router['alternating_s'])} |",
        f"| cold request (model not loaded): time to first byte s | {lalo['cold_ttft_s']:.2f} | "
        f"{router['cold_ttft_s']:.2f} | {ratio(lalo['cold_ttft_s'], router['cold_ttft_s'])} |",
        f"| ... its HTTP status | {lalo['cold_status']:.0f} | {router['cold_status']:.0f} | |",
        f"| ... errors in the alternating run | {lalo['alternating_errors']:.0f} | "
        f"{router['alternating_errors']:.0f} | |",
        f"| model starts during the {args.burst} requests at once | {lalo['burst_swaps']:.0f} "
        f"| {router['burst_swaps']:.0f} | |",
        f"| model starts during the 8 alternating requests | {lalo['alternating_swaps']:.0f} "
        f"| {router['alternating_swaps']:.0f} | |",
        "",
        "Model starts: lalo's evictions (`/api/status`), the router's \"spawning server instance\" "
        "log lines, each counted over the part of the run named.",
        "",
        *(["Answers that were not 200:", "",
           *(f"- {count}x {said}" for said, count in ERRORS.items()), ""] if ERRORS else []),
        "Targets (issue 15): the burst at most 0.5x the router's time with 0 errors; the "
        "alternating run not slower than the router.",
    ]
    (args.out / "scheduling-benchmark.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
