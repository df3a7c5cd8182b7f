"""Save the screenshots of the dashboard's try-and-watch panels for docs/dashboard.md:
docs/dashboard-playground.png, docs/dashboard-charts.png, docs/dashboard-activity.png and
docs/dashboard-logs.png.

Starts the real `lalo up` serving the real SmolLM2-135M-Instruct (from lalo's catalog, pulled
once), asks it a question in the playground, sends some traffic for a minute so the charts
and the activity list have data, opens the model's log, then photographs each panel in
Debian's chromium through Playwright.

    python scripts/screenshot_watch.py [--out docs] [--chromium /usr/bin/chromium] [--traffic 60]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?",
             "Write a haiku about the sea.", "Who wrote Hamlet?"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"lalo up exited:\n{log.read_text()}")
        try:
            models = httpx.get(url + "/api/status", timeout=2).json()["models"]
            if models and all(m["state"] == "ready" for m in models):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the model did not become ready in 300 s")


def traffic(url: str, seconds: float) -> None:
    """Chat requests of varied length, and one for a model that does not exist (a 404)."""
    rng = random.Random(7)
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=120) as client:
        client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
        while time.monotonic() < deadline:
            client.post("/v1/chat/completions", json={
                "model": "smol", "max_tokens": rng.choice([16, 32, 64]),
                "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}]})
            time.sleep(rng.uniform(0.5, 2.0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--traffic", type=float, default=60.0, help="seconds of traffic")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lalo-screenshot-watch-") as tmp:
        work = Path(tmp)
        config = work / "lalo.yaml"
        config.write_text(yaml.safe_dump({"models": {
            "smol": {"catalog": "smollm2-135m-instruct", "ctx_size": 2048,
                     "aliases": ["smollm2"]}}}))
        env = {**os.environ, "LALO_STATE_DIR": str(work / "state"),
               "LALO_CONFIG_DIR": str(work / "config")}
        env.pop("LALO_API_KEYS", None)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = work / "lalo-up.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "launcher", "up", "--config",
                                     str(config), "--port", str(port)],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_ready(url, proc, log_path)
                shoot(url, args)
            finally:
                proc.terminate()
                proc.wait(60)
    for name in ("playground", "charts", "activity", "logs"):
        path = args.out / f"dashboard-{name}.png"
        print(f"{path}: {path.stat().st_size // 1024} KiB")
    return 0


def shoot(url: str, args: argparse.Namespace) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS,
                                             headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_selector('[data-testid="model-card"][data-state="ready"]', timeout=60_000)
        traffic(url, args.traffic)
        page.get_by_test_id("playground-system").fill("You are a helpful assistant.")
        page.get_by_test_id("playground-message").fill("What is the capital of France?")
        page.get_by_test_id("playground-temperature").fill("0")
        page.get_by_test_id("playground-send").click()
        page.wait_for_selector('#pg-reply[data-state="done"]', state="attached", timeout=180_000)
        page.locator("#playground").screenshot(path=str(args.out / "dashboard-playground.png"))
        page.wait_for_function(
            "Number(document.querySelector('[data-testid=chart-tps]').dataset.points) >= 6",
            timeout=120_000)
        page.locator("#charts").screenshot(path=str(args.out / "dashboard-charts.png"))
        page.wait_for_selector('[data-testid="activity-row"]', timeout=30_000)
        page.locator("#activity").screenshot(path=str(args.out / "dashboard-activity.png"))
        page.get_by_test_id("logs-toggle").click()
        page.get_by_test_id("lalo-log-toggle").click()
        page.wait_for_function("document.querySelector('[data-testid=logs-info]').textContent"
                               ".startsWith('following')", timeout=30_000)
        page.locator('[data-testid="model-card"]').screenshot(
            path=str(args.out / "dashboard-logs.png"))
        browser.close()


if __name__ == "__main__":
    sys.exit(main())
