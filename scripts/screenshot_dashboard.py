"""Save the dashboard's screenshots for the docs: docs/dashboard.png (1280x800) and
docs/dashboard-narrow.png (400 px wide, whole page).

Starts the real `lalo up` on generated random-weight models (two that load, one whose file
is cut short so it shows the failed state), sends a few completions so the tokens/s
sparklines have data, then opens the page in Debian's chromium through Playwright.

    python scripts/screenshot_dashboard.py [--out docs] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml
from playwright.sync_api import sync_playwright

from launcher import paths
from launcher.models.synthetic import SHAPES, write_synthetic_model

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# (config name, shape, tensor type, aliases): realistic sizes so the RAM bar shows them
MODELS = [
    ("liquid-tool", "lfm2-350m", "Q8_0", ["tool"]),
    ("liquid-extract", "llama-350m", "Q4_0", ["extract", "extractor"]),
]
BROKEN = "qwen-chat"
READY_TIMEOUT = 300.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = condition()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        time.sleep(0.5)
    raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")


def model_files(directory: Path) -> dict[str, Path]:
    """The generated GGUFs (cached between runs) and one truncated copy."""
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for name, shape, tensor_type, _ in MODELS:
        path = directory / f"screenshot-{shape}-{tensor_type.lower()}.gguf"
        if not path.exists():
            print(f"writing {path.name} ...", file=sys.stderr)
            write_synthetic_model(path, SHAPES[shape], tensor_type=tensor_type, seed=len(files),
                                  name=f"lalo screenshot {shape} (random weights)")
        files[name] = path
    broken = directory / "screenshot-truncated.gguf"
    data = files[MODELS[1][0]].read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    files[BROKEN] = broken
    return files


def write_config(path: Path, files: dict[str, Path]) -> None:
    models: dict[str, dict[str, Any]] = {
        name: {"file": str(files[name]), "ctx_size": 2048, "aliases": aliases}
        for name, _, _, aliases in MODELS
    }
    models[BROKEN] = {"file": str(files[BROKEN]), "ctx_size": 4096, "aliases": ["chat"]}
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))


def exercise(url: str) -> None:
    """A few completions per model, so requests and tokens/s have something to show."""
    with httpx.Client(base_url=url, timeout=120.0) as client:
        for round_ in range(6):
            for name, _, _, _ in MODELS:
                client.post("/v1/completions", json={
                    "model": name, "prompt": "Summarise the ticket " * (round_ + 1),
                    "max_tokens": 12 + 6 * round_,
                }).raise_for_status()


def screenshot(url: str, out: Path, chromium: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS,
                                             headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        page.wait_for_selector('[data-testid="model-card"][data-state="failed"]', timeout=60_000)
        page.wait_for_function(
            "document.querySelectorAll('[data-testid=model-card][data-state=ready]').length >= 2",
            timeout=60_000,
        )
        page.screenshot(path=str(out / "dashboard.png"))
        page.set_viewport_size({"width": 400, "height": 800})
        page.screenshot(path=str(out / "dashboard-narrow.png"), full_page=True)
        browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--port", type=int, default=0, help="proxy port (default: a free one)")
    args = parser.parse_args()
    files = model_files(paths.synthetic_dir())
    with tempfile.TemporaryDirectory(prefix="lalo-screenshot-") as tmp:
        work = Path(tmp)
        config = work / "lalo.yaml"
        write_config(config, files)
        env = {**os.environ, "LALO_STATE_DIR": str(work / "state"),
               "LALO_CONFIG_DIR": str(work / "config")}
        env.pop("LALO_API_KEYS", None)
        port = args.port or free_port()
        url = f"http://127.0.0.1:{port}"
        log = (work / "lalo-up.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", "up", "--config", str(config), "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            def ready() -> bool:
                if proc.poll() is not None:
                    raise SystemExit(f"lalo up exited:\n{(work / 'lalo-up.log').read_text()}")
                states = {m["name"]: m["state"]
                          for m in httpx.get(url + "/api/status", timeout=5).json()["models"]}
                return all(states[name] == "ready" for name, _, _, _ in MODELS)

            wait_for(ready, READY_TIMEOUT, "the models to be ready")
            exercise(url)
            args.out.mkdir(parents=True, exist_ok=True)
            screenshot(url, args.out, args.chromium)
        finally:
            proc.terminate()
            proc.wait(60)
            log.close()
    for name in ("dashboard.png", "dashboard-narrow.png"):
        path = args.out / name
        print(f"{path}: {path.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
