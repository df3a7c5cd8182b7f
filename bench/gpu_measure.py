"""On a GPU machine: lalo's VRAM estimate vs llama-server's CUDA buffers and nvidia-smi, and
decode tokens/s with every layer offloaded vs on the CPU (issue 19 item 4; not yet run).

    PYTHONPATH=. python bench/gpu_measure.py --server PATH/TO/cuda/llama-server \\
        --model smollm2=PATH.gguf --model gemma3=PATH.gguf [--ctx 4096] [--out docs/gpu-measured.json]

Per model and `-ngl` (all layers, then 0): starts llama-server on a free port, waits for
/health, reads the `CUDA0 model/KV/compute buffer size` lines of its log and its VRAM from
`nvidia-smi --query-compute-apps`, decodes 128 tokens three times (best counts, from the
server's own `timings.predicted_per_second`), stops it. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from launcher.models.gguf_file import read_gguf
from launcher.models.shape import ModelFacts
from launcher.placement.gpu_split import split_memory

MIB = 1024**2
_BUFFER = re.compile(r"(CUDA\d+|CUDA_Host|CPU(?:_Mapped|_REPACK)?)\s+(model|KV|compute) buffer size "
                     r"=\s+([\d.]+) MiB")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vram_of(pid: int) -> int | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True,
                              check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None  # no nvidia-smi: a CPU machine (the script's smoke run)
    for line in done.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid):
            return int(fields[1]) * MIB
    return None


def measure(server: str, model: Path, ctx: int, ngl: int) -> dict[str, object]:
    port = free_port()
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc = subprocess.Popen([server, "-m", str(model), "--port", str(port), "-c", str(ctx),
                                 "-np", "1", "-ngl", str(ngl), "--log-verbosity", "4"],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None:
                    tail = Path(log.name).read_text()[-2000:]
                    raise RuntimeError(f"llama-server exited {proc.returncode}: {tail}")
                time.sleep(0.2)
            speeds = []
            for _ in range(3):
                reply = httpx.post(f"{url}/completion", timeout=300, json={
                    "prompt": "Write a long story about a lighthouse keeper.", "n_predict": 128,
                    "temperature": 0, "ignore_eos": True, "cache_prompt": False}).json()
                speeds.append(float(reply["timings"]["predicted_per_second"]))
            vram = vram_of(proc.pid)
            buffers: dict[str, float] = {}
            for device, kind, mib in _BUFFER.findall(Path(log.name).read_text()):
                key = f"{device} {kind}"
                buffers[key] = buffers.get(key, 0.0) + float(mib) * MIB
            return {"ngl": ngl, "decode_tokens_per_s": max(speeds), "nvidia_smi_vram": vram,
                    "buffers": buffers}
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True)
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH")
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = []
    for item in args.model:
        name, _, path = item.partition("=")
        facts = ModelFacts.from_gguf(read_gguf(Path(path)))
        full = facts.n_layer + 1
        estimate = split_memory(facts, args.ctx, 1, full)
        device = estimate.devices[0]
        row: dict[str, object] = {
            "model": name, "ctx": args.ctx,
            "estimate": {"vram": estimate.vram, **device.as_dict(), "ram": estimate.ram.total},
            "gpu": measure(args.server, Path(path), args.ctx, full),
            "cpu": measure(args.server, Path(path), args.ctx, 0),
        }
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    text = json.dumps({"results": results}, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
