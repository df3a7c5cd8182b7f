"""Size of the single binary `lalo-ai` without models, and its time from start to ready against
`lalo up` in a virtualenv on the same config, engine and model; writes
docs/packaging-benchmark.md (and .json).

Builds `lalo-ai` twice from one generated random-weight model: models beside it (the size
without models) and embedded (what is timed). Then starts, alternately, `./lalo-ai` in a
clean environment and `python -m launcher up` with this virtualenv, --rounds times each, and
records when the proxy answers /health and when the model is ready.

    python bench/package_size.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
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

from launcher.engines.builder import build_engine
from launcher.models.synthetic import SHAPES, write_synthetic_model
from launcher.packaging.build import Packager
from launcher.packaging.spec import load_spec
from launcher.units import format_size

ROOT = Path(__file__).resolve().parent.parent
NAME = "lalo-ai"
SIZE_TARGET = 60 * 1000**2
READY_TIMEOUT = 120.0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spec_file(folder: Path, model: Path, port: int, models: str) -> Path:
    spec = folder / f"{NAME}-{models}.yaml"
    spec.write_text(yaml.safe_dump({
        "name": NAME,
        "models": {"demo": {"file": str(model), "license": "MIT", "ctx_size": 2048}},
        "targets": ["exe"], "platforms": ["linux"], "proxy": {"port": port},
        "exe": {"models": models},
    }, sort_keys=False))
    return spec


def build_exe(spec: Path, out: Path) -> tuple[Path, float]:
    started = time.perf_counter()
    result = Packager(report=lambda line: print("  " + line, file=sys.stderr)).build(
        load_spec(str(spec)), out, ["exe"])
    assert result.exe is not None
    return result.exe.path, time.perf_counter() - started


def start_to_ready(argv: list[str], env: dict[str, str], port: int) -> dict[str, float]:
    """Seconds from starting `argv` to the proxy's /health answering and to the model ready."""
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marks: dict[str, float] = {}
    try:
        with httpx.Client(trust_env=False, timeout=1.0) as client:
            while "ready" not in marks:
                if proc.poll() is not None:
                    raise RuntimeError(f"{argv[0]} exited with {proc.returncode}")
                if time.perf_counter() - started > READY_TIMEOUT:
                    raise RuntimeError(f"{argv[0]}: not ready within {READY_TIMEOUT} s")
                try:
                    if "health" not in marks and client.get(url + "/health").status_code == 200:
                        marks["health"] = time.perf_counter() - started
                    if "health" in marks:
                        models = client.get(url + "/api/status").json()["models"]
                        if all(m["state"] == "ready" for m in models):
                            marks["ready"] = time.perf_counter() - started
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lalo-package-bench-"))
    model = work / "demo-random-weights.gguf"
    write_synthetic_model(model, SHAPES["demo"], tensor_type="F16", seed=1,
                          name="package bench demo (random weights)")
    port = free_port()
    print("building lalo-ai (models beside, for the size without models)", file=sys.stderr)
    beside, _ = build_exe(spec_file(work, model, port, "beside"), work / "beside")
    print("building lalo-ai (models embedded, timed)", file=sys.stderr)
    embedded, build_seconds = build_exe(spec_file(work, model, port, "embed"), work / "embed")
    engine = build_engine("portable")

    venv_config = work / "lalo.yaml"
    venv_config.write_text(yaml.safe_dump({
        "proxy": {"port": port},
        "engines": {"llama_server": {"path": str(engine.server), "variant": "portable"}},
        "models": {"demo": {"file": str(model), "ctx_size": 2048, "license": "MIT"}},
    }))
    exe_home = work / "exe-home"
    exe_home.mkdir()
    exe_env = {"HOME": str(exe_home), "PATH": "/usr/bin:/bin"}
    venv_env = {**os.environ, "HOME": str(work / "venv-home"), "LALO_CONFIG": ""}
    venv_env.pop("LALO_STATE_DIR", None)
    exe_argv = [str(embedded)]
    venv_argv = [sys.executable, "-m", "launcher", "up", "--config", str(venv_config)]

    first = start_to_ready(exe_argv, exe_env, port)  # unpacks the payload into the cache
    samples: dict[str, list[dict[str, float]]] = {"exe": [], "venv": []}
    for _ in range(args.rounds):
        samples["exe"].append(start_to_ready(exe_argv, exe_env, port))
        samples["venv"].append(start_to_ready(venv_argv, venv_env, port))

    def median(kind: str, mark: str) -> float:
        return statistics.median(s[mark] for s in samples[kind])

    result: dict[str, Any] = {
        "exe_size_without_models": beside.stat().st_size,
        "exe_size_with_model": embedded.stat().st_size,
        "model_size": model.stat().st_size,
        "size_target": SIZE_TARGET,
        "build_seconds_exe": round(build_seconds, 1),
        "first_start": first,
        "rounds": args.rounds,
        "samples": samples,
        "median": {kind: {mark: round(median(kind, mark), 3) for mark in ("health", "ready")}
                   for kind in samples},
        "machine": {
            "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "ram": psutil.virtual_memory().total, "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    write_report(result)
    print(json.dumps(result["median"], indent=2))


def write_report(result: dict[str, Any]) -> None:
    med = result["median"]
    exe_ready, venv_ready = med["exe"]["ready"], med["venv"]["ready"]
    size = result["exe_size_without_models"]
    lines = [
        "# Packaging benchmark: the single binary",
        "",
        "Written by `python bench/package_size.py` (one run; interleaved samples; the model is "
        "a generated random-weight 6M-parameter llama, "
        f"{format_size(result['model_size'])}).",
        "",
        f"Machine: {result['machine']['cpus']} CPUs, {format_size(result['machine']['ram'])} "
        f"RAM, {result['machine']['platform']}, Python {result['machine']['python']}; load "
        f"average during the run {result['machine']['load_average']} (shared machine: compare "
        "the two columns, not absolute times across runs).",
        "",
        "## Size",
        "",
        "| file | bytes | size | target |",
        "|---|---|---|---|",
        f"| `lalo-ai` without models | {size:,} | {format_size(size)} | "
        f"<= 60 MB: {'met' if size <= SIZE_TARGET else 'NOT met'} |",
        f"| `lalo-ai` with the model embedded | {result['exe_size_with_model']:,} | "
        f"{format_size(result['exe_size_with_model'])} | |",
        "",
        f"Build time of `lalo build --target exe` (PyInstaller one-file, warm caches): "
        f"{result['build_seconds_exe']} s.",
        "",
        "## Start to ready",
        "",
        f"Median of {result['rounds']} starts each, alternating; seconds from starting the "
        "process to the proxy answering `/health`, and to the model being `ready`.",
        "",
        "| | proxy answers | model ready |",
        "|---|---|---|",
        f"| `./lalo-ai` (clean env, payload already unpacked) | {med['exe']['health']:.2f} | "
        f"{exe_ready:.2f} |",
        f"| `lalo up` in the virtualenv (same config and engine) | {med['venv']['health']:.2f} | "
        f"{venv_ready:.2f} |",
        f"| difference | {med['exe']['health'] - med['venv']['health']:+.2f} | "
        f"{exe_ready - venv_ready:+.2f} |",
        "",
        f"First start of a new `lalo-ai` (unpacks engine and model into the cache): "
        f"{result['first_start']['ready']:.2f} s to ready.",
        f"Target: at most 1 s more than the virtualenv: "
        f"{'met' if exe_ready - venv_ready <= 1.0 else 'NOT met'}.",
        "",
    ]
    docs = ROOT / "docs"
    (docs / "packaging-benchmark.md").write_text("\n".join(lines))
    (docs / "packaging-benchmark.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
