"""Scheduling when models do not all fit: lalo (`max_loaded: 1`) against llama.cpp's router
(`--models-max 1`), the same llama-server binary and the same two real models, in one run.

Cases, each taken by lalo and the router in turn (who goes first alternates by round), each
starting from the same state (SmolLM2 loaded, Gemma not):
  - burst: 16 chat requests at once, 8 per model, interleaved: total time, errors, swaps
  - alternating: 8 requests one after another, A,B,A,B: total time
  - cold: time to first token of a streamed request to a model that is not loaded
Writes docs/scheduling-benchmark.md and docs/scheduling-benchmark.json.

    python bench/scheduling.py [--rounds 3] [--server PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy_overhead import free_port, parent_death_signal, wait_http
from startup import ROOT, clean_environ

sys.path.insert(0, str(ROOT))
from tests.support.real_models import real_model

MODELS = {"smol": "smollm2-135m-instruct", "gemma": "gemma-3-270m"}
CTX = 2048
MAX_TOKENS = 16
QUESTION = "What is the capital of France? Answer in one sentence."


@dataclass
class Target:
    name: str
    url: str
    process: subprocess.Popen[bytes]

    async def unload(self, client: httpx.AsyncClient, model: str) -> None:
        if self.name == "lalo":
            response = await client.post(f"{self.url}/api/models/{model}/unload")
        else:
            response = await client.post(f"{self.url}/models/unload", json={"model": model})
        if response.status_code not in (200, 400):  # the router says 400 when not loaded
            raise RuntimeError(f"{self.name}: unload {model}: {response.status_code} {response.text}")

    async def wait_unloaded(self, client: httpx.AsyncClient, model: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not await self.loaded(client, model):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name}: {model} still loaded")

    async def loaded(self, client: httpx.AsyncClient, model: str) -> bool:
        if self.name == "lalo":
            status = (await client.get(f"{self.url}/api/status")).json()
            row = next(m for m in status["models"] if m["name"] == model)
            return bool(row["state"] not in ("stopped", "failed"))
        listing = (await client.get(f"{self.url}/models")).json()
        for entry in listing.get("data", []):
            if entry.get("id") == model:
                value = entry.get("status", {}).get("value")
                return value not in (None, "unloaded")
        return False

    async def swaps(self, client: httpx.AsyncClient) -> int | None:
        """Loads counted by lalo itself (its /api/status); the router does not report them."""
        if self.name != "lalo":
            return None
        status = (await client.get(f"{self.url}/api/status")).json()
        total = 0
        for row in status["models"]:
            loads = row.get("loads")
            if not isinstance(loads, int):
                return None
            total += loads
        return total


async def chat(client: httpx.AsyncClient, target: Target, model: str,
               stream: bool = False) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "seed": 1, "stream": stream}
    started = time.perf_counter()
    try:
        if not stream:
            response = await client.post(f"{target.url}/v1/chat/completions", json=body)
            return {"status": response.status_code, "seconds": time.perf_counter() - started,
                    "error": None if response.status_code == 200 else response.text[:200]}
        async with client.stream("POST", f"{target.url}/v1/chat/completions", json=body) as response:
            first = None
            async for line in response.aiter_lines():
                if first is None and line.startswith("data:") and '"content"' in line:
                    first = time.perf_counter() - started
            return {"status": response.status_code, "ttft": first,
                    "seconds": time.perf_counter() - started,
                    "error": None if response.status_code == 200 else "stream failed"}
    except httpx.HTTPError as exc:
        return {"status": 0, "seconds": time.perf_counter() - started, "error": repr(exc)}


async def reset(client: httpx.AsyncClient, target: Target) -> None:
    """The common starting state: smol loaded and warm, gemma not loaded."""
    await target.unload(client, "gemma")
    await target.wait_unloaded(client, "gemma")
    warm = await chat(client, target, "smol")
    if warm["status"] != 200:
        raise RuntimeError(f"{target.name}: warm-up failed: {warm}")


async def burst(client: httpx.AsyncClient, target: Target) -> dict[str, Any]:
    await reset(client, target)
    before = await target.swaps(client)
    order = ["smol", "gemma"] * 8
    started = time.perf_counter()
    outcomes = await asyncio.gather(*(chat(client, target, model) for model in order))
    wall = time.perf_counter() - started
    after = await target.swaps(client)
    errors = [o for o in outcomes if o["status"] != 200]
    return {"seconds": wall, "errors": len(errors), "error_examples": [e["error"] for e in errors[:3]],
            "swaps": after - before if after is not None and before is not None else None}


async def alternating(client: httpx.AsyncClient, target: Target) -> dict[str, Any]:
    await reset(client, target)
    started = time.perf_counter()
    outcomes = [await chat(client, target, model) for model in ["gemma", "smol"] * 4]
    errors = [o for o in outcomes if o["status"] != 200]
    return {"seconds": time.perf_counter() - started, "errors": len(errors)}


async def cold(client: httpx.AsyncClient, target: Target) -> dict[str, Any]:
    await reset(client, target)
    outcome = await chat(client, target, "gemma", stream=True)
    return {"ttft": outcome.get("ttft"), "errors": int(outcome["status"] != 200)}


CASES = {"burst": burst, "alternating": alternating, "cold": cold}


def start_lalo(workdir: Path, files: dict[str, Path], port: int) -> subprocess.Popen[bytes]:
    config = workdir / "lalo.yaml"
    config.write_text(yaml.safe_dump({
        "resources": {"max_loaded": 1},
        "proxy": {"queue_size": 64},
        "models": {name: {"file": str(path), "ctx_size": CTX, "parallel": 1, "preload": False}
                   for name, path in files.items()},
    }, sort_keys=False))
    env = {**clean_environ(), "LALO_STATE_DIR": str(workdir / "state"),
           "LALO_CONFIG_DIR": str(workdir / "config"), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", "up", "--config", str(config), "--port", str(port)],
        stdout=(workdir / "lalo.log").open("wb"), stderr=subprocess.STDOUT, env=env,
        start_new_session=True, preexec_fn=parent_death_signal)


def start_router(server: Path, workdir: Path, files: dict[str, Path], port: int
                 ) -> subprocess.Popen[bytes]:
    models_dir = workdir / "router-models"
    models_dir.mkdir(exist_ok=True)
    for name, path in files.items():
        link = models_dir / f"{name}.gguf"
        if not link.exists():
            link.symlink_to(path)
    return subprocess.Popen(
        [str(server), "--models-dir", str(models_dir), "--models-max", "1", "--host", "127.0.0.1",
         "--port", str(port), "-c", str(CTX), "-np", "1"],
        stdout=(workdir / "router.log").open("wb"), stderr=subprocess.STDOUT,
        env=clean_environ(), start_new_session=True, preexec_fn=parent_death_signal)


def find_server() -> Path:
    from launcher.engines.registry import cached_engines

    for folder, manifest in cached_engines():
        if manifest.variant == "native":
            return folder / "bin" / "llama-server"
    raise SystemExit("no llama-server in lalo's cache: run `lalo engine build` first")


async def run(targets: list[Target], rounds: int) -> dict[str, Any]:
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        case: {t.name: [] for t in targets} for case in CASES}
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        for round_number in range(rounds):
            order = targets if round_number % 2 == 0 else targets[::-1]
            for case, measure in CASES.items():
                for target in order:
                    outcome = await measure(client, target)
                    results[case][target.name].append(outcome)
                    print(f"round {round_number + 1} {case:11s} {target.name:6s} {outcome}",
                          flush=True)
    return results


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for case, per_target in results.items():
        summary[case] = {}
        for name, runs in per_target.items():
            key = "ttft" if case == "cold" else "seconds"
            values = [r[key] for r in runs if r.get(key) is not None]
            swaps = [r["swaps"] for r in runs if r.get("swaps") is not None]
            summary[case][name] = {
                "median": statistics.median(values) if values else None,
                "runs": values,
                "errors": sum(r["errors"] for r in runs),
                "swaps": statistics.median(swaps) if swaps else None,
            }
    return summary


def report(summary: dict[str, Any], rounds: int, out: Path) -> None:
    def cell(case: str, name: str) -> str:
        row = summary[case][name]
        return "n/a" if row["median"] is None else f"{row['median']:.2f} s"

    def ratio(case: str) -> str:
        lalo, router = summary[case]["lalo"]["median"], summary[case]["router"]["median"]
        return f"{lalo / router:.2f}x" if lalo and router else "n/a"

    lines = [
        "# Scheduling benchmark: lalo vs llama.cpp's router, one model in memory at a time",
        "",
        f"Written by `bench/scheduling.py` ({rounds} rounds, medians; lalo and the router take each "
        "case in turn, who goes first alternating by round). Same llama-server binary, same real "
        "models (SmolLM2-135M-Instruct Q4_1 and Gemma 3 270M Q4_K_M), ctx 2048, one slot each; "
        "lalo with `max_loaded: 1`, the router with `--models-max 1`. Every case starts with "
        f"SmolLM2 loaded and Gemma not; chat completions of at most {MAX_TOKENS} tokens.",
        "",
        "| case | lalo | router | lalo / router | errors lalo / router | lalo swaps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {"burst": "16 at once, 8 per model: total", "alternating": "8 in turn, A,B,A,B: total",
             "cold": "cold model: time to first token"}
    for case, label in names.items():
        lalo, router = summary[case]["lalo"], summary[case]["router"]
        swaps = "" if lalo["swaps"] is None else f"{lalo['swaps']:g}"
        lines.append(f"| {label} | {cell(case, 'lalo')} | {cell(case, 'router')} | {ratio(case)} | "
                     f"{lalo['errors']} / {router['errors']} | {swaps} |")
    lines += ["", "Targets (issue 15): the burst at most 0.5x the router's time with 0 errors; the "
              "alternating case no slower than the router.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "scheduling-benchmark")
    args = parser.parse_args()
    server = args.server or find_server()
    files = {name: real_model(model_id) for name, model_id in MODELS.items()}
    with tempfile.TemporaryDirectory(prefix="lalo-sched-") as tmp:
        workdir = Path(tmp)
        lalo_port, router_port = free_port(), free_port()
        processes = [start_lalo(workdir, files, lalo_port),
                     start_router(server, workdir, files, router_port)]
        try:
            wait_http(f"http://127.0.0.1:{lalo_port}/health")
            wait_http(f"http://127.0.0.1:{router_port}/health")
            targets = [Target("lalo", f"http://127.0.0.1:{lalo_port}", processes[0]),
                       Target("router", f"http://127.0.0.1:{router_port}", processes[1])]
            results = asyncio.run(run(targets, args.rounds))
        finally:
            for process in processes:
                if process.poll() is None:
                    os.killpg(process.pid, 15)
                    process.wait(60)
    report(summarise(results), args.rounds, args.out)


if __name__ == "__main__":
    main()
