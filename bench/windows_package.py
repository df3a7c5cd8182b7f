"""The Windows package under wine, measured in one run: sizes of NAME.exe and NAME-setup.exe for
the two-model spec of tests/integration/test_windows_package.py (the real SmolLM2-135M and a
random-weight model), NAME.exe's first start (unpack) and second start to /health, and
SmolLM2's decode speed through the router under wine against the Linux native engine of the
same llama.cpp commit serving the same file directly (alternating rounds).

    python bench/windows_package.py [--rounds 5] [--tokens 128] [--out docs/windows-package.json]

Needs wine, mingw-w64 and NSIS (scripts/test.sh installs them) and builds what is missing (the
Windows engine: about 10 minutes). Decode figures are llama-server's own
`timings.predicted_per_second`, 2 threads, temperature 0, ignore_eos.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.engines.builder import build_engine
from launcher.models.synthetic import SHAPES, write_synthetic_model
from tests.support.real_models import real_model

PROMPT = "Write a long story about a lighthouse keeper and the sea."
LALO = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "lalo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_health(url: str, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"exited with {proc.returncode} before {url}/health answered")
        try:
            if httpx.get(f"{url}/health", timeout=2.0, trust_env=False).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url}/health did not answer within {timeout:.0f} s")


def decode(url: str, model: str, tokens: int) -> float:
    response = httpx.post(f"{url}/v1/completions", timeout=600.0, trust_env=False, json={
        "model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
        "ignore_eos": True})
    response.raise_for_status()
    return float(response.json()["timings"]["predicted_per_second"])


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def build_package(work: Path) -> tuple[Path, Path, Path]:
    smol = real_model("smollm2-135m-instruct")
    noise = work / "noise.gguf"
    write_synthetic_model(noise, SHAPES["demo"], tensor_type="F16", seed=2,
                          name="lalo bench noise (random weights)")
    spec = work / "duo.yaml"
    spec.write_text(yaml.safe_dump({"name": "duo", "models": {
        "smol": {"file": str(smol), "license": "Apache-2.0", "ctx_size": 1024, "threads": 2},
        "noise": {"file": str(noise), "license": "MIT", "ctx_size": 512}}}))
    lalo = str(LALO) if LALO.exists() else "lalo"
    subprocess.run([lalo, "build", str(spec), "--target", "windows", "--out", str(work / "dist")],
                   check=True)
    return work / "dist" / "duo.exe", work / "dist" / "duo-setup.exe", smol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("docs/windows-package.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lalo-winbench-"))
    env = {**os.environ, "WINEPREFIX": str(work / "prefix"), "WINEDEBUG": "-all",
           "WINEDLLOVERRIDES": "mscoree,mshtml="}
    try:
        exe, setup, smol = build_package(work)
        native = build_engine("native").server
        subprocess.run(["wineboot", "-i"], env=env, capture_output=True, check=False, timeout=300)
        starts, wine_tps, native_tps = [], [], []
        for round_ in range(args.rounds):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = subprocess.Popen(["wine", str(exe), "--port", str(port)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                starts.append(wait_health(url, proc))
                decode(url, "smol", 8)  # loads the model (the router starts its server)
                wine_tps.append(decode(url, "smol", args.tokens))
            finally:
                stop(proc)
                subprocess.run(["wineserver", "-w"], env=env, check=False, timeout=120)
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = subprocess.Popen([str(native), "-m", str(smol), "--host", "127.0.0.1", "--port",
                                     str(port), "-c", "1024", "-t", "2", "--alias", "smol"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_health(url, proc)
                decode(url, "smol", 8)
                native_tps.append(decode(url, "smol", args.tokens))
            finally:
                stop(proc)
            print(f"round {round_ + 1}: start {starts[-1]:.1f} s, wine {wine_tps[-1]:.1f} tok/s, "
                  f"native {native_tps[-1]:.1f} tok/s", flush=True)
        result: dict[str, Any] = {
            "exe_bytes": exe.stat().st_size, "setup_bytes": setup.stat().st_size,
            "first_start_s": round(starts[0], 2),
            "later_starts_s": [round(s, 2) for s in starts[1:]],
            "wine_decode_tok_s": [round(t, 1) for t in wine_tps],
            "native_decode_tok_s": [round(t, 1) for t in native_tps],
            "ratio_median": round(statistics.median(wine_tps) / statistics.median(native_tps), 3),
            "tokens": args.tokens, "rounds": args.rounds,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        subprocess.run(["wineserver", "-k"], env=env, check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
