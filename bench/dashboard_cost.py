"""What the dashboard costs lalo's proxy: CPU seconds per 1,000 streamed tokens with the page
open (status every second, charts, activity, a model's log and lalo's log streaming) and with
it closed, in interleaved rounds on one `lalo up` serving the real SmolLM2-135M-Instruct; also
the proxy's CPU while idle with the page open, and what a /metrics scrape costs (lalo's own
metrics plus every ready llama-server's, cached for 2 s).

Only the proxy process's own CPU time counts (psutil, children excluded): the model server's
work is the same either way. Writes docs/dashboard-cost.json and the table between the
`dashboard-cost` markers in docs/dashboard.md.

    python bench/dashboard_cost.py [--rounds 4] [--requests 8] [--tokens 128] [--idle 20]
                                   [--chromium /usr/bin/chromium] [--no-write]
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "dashboard.md"
RESULTS = ROOT / "docs" / "dashboard-cost.json"
START, END = "<!-- dashboard-cost:start -->", "<!-- dashboard-cost:end -->"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def lalo(work: Path) -> Iterator[tuple[str, psutil.Process]]:
    config = work / "lalo.yaml"
    config.write_text(yaml.safe_dump({"models": {
        "smol": {"catalog": "smollm2-135m-instruct", "ctx_size": 2048}}}))
    port = free_port()
    env = {**os.environ, "LALO_STATE_DIR": str(work / "state"),
           "LALO_CONFIG_DIR": str(work / "config")}
    env.pop("LALO_API_KEYS", None)
    log = (work / "lalo-up.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "up", "--config", str(config),
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"lalo up exited:\n{(work / 'lalo-up.log').read_text()}")
            try:
                models = httpx.get(url + "/api/status", timeout=2).json()["models"]
                if models and models[0]["state"] == "ready":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("SmolLM2 did not become ready in 300 s")
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def stream_tokens(client: httpx.Client, tokens: int) -> int:
    """One streamed chat completion of exactly `tokens` tokens; the tokens generated."""
    body = {"model": "smol", "stream": True, "max_tokens": tokens, "ignore_eos": True,
            "temperature": 0.8, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}]}
    generated = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    generated = int(usage["completion_tokens"])
    return generated


def measure(url: str, process: psutil.Process, requests: int, tokens: int) -> dict[str, float]:
    with httpx.Client(base_url=url, timeout=300) as client:
        stream_tokens(client, 8)  # warm
        before, started = cpu(process), time.perf_counter()
        generated = sum(stream_tokens(client, tokens) for _ in range(requests))
        spent, wall = cpu(process) - before, time.perf_counter() - started
    return {"cpu_s": spent, "tokens": generated, "wall_s": wall,
            "cpu_s_per_1000_tokens": spent / generated * 1000}


@contextmanager
def dashboard(url: str, chromium: str) -> Iterator[None]:
    """The page open with everything that streams or polls switched on."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS,
                                             headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.wait_for_selector('[data-testid="model-card"][data-state="ready"]', timeout=60_000)
        page.get_by_test_id("logs-toggle").click()
        page.get_by_test_id("lalo-log-toggle").click()
        page.wait_for_function("document.querySelector('[data-testid=logs-info]').textContent"
                               ".startsWith('following')", timeout=30_000)
        try:
            yield
        finally:
            browser.close()


def idle_cpu(process: psutil.Process, seconds: float) -> float:
    before = cpu(process)
    time.sleep(seconds)
    return (cpu(process) - before) / seconds * 100


def scrape_cost(url: str, count: int = 20) -> dict[str, float]:
    """/metrics right after the cache expired (all servers scraped) and from the cache."""
    fresh, cached = [], []
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(count):
            time.sleep(2.1)
            started = time.perf_counter()
            client.get("/metrics").raise_for_status()
            fresh.append(time.perf_counter() - started)
            started = time.perf_counter()
            text = client.get("/metrics").text
            cached.append(time.perf_counter() - started)
    upstream = next(float(line.split()[1]) for line in text.splitlines()
                    if line.startswith("lalo_upstream_scrape_seconds "))
    return {"fresh_ms_median": statistics.median(fresh) * 1000,
            "cached_ms_median": statistics.median(cached) * 1000,
            "upstream_scrape_ms_last": upstream * 1000}


def busy(result: dict[str, Any], page: str) -> float:
    rounds = [r for r in result["rounds"] if r["page"] == page]
    return statistics.median(r["cpu_s"] / r["wall_s"] * 100 for r in rounds)


def speed(result: dict[str, Any], page: str) -> float:
    rounds = [r for r in result["rounds"] if r["page"] == page]
    return statistics.median(r["tokens"] / r["wall_s"] for r in rounds)


def table(result: dict[str, Any]) -> str:
    closed = [r["cpu_s_per_1000_tokens"] for r in result["rounds"] if r["page"] == "closed"]
    opened = [r["cpu_s_per_1000_tokens"] for r in result["rounds"] if r["page"] == "open"]
    scrape = result["scrape"]
    lines = [
        f"Measured {result['date']} on {result['machine']} ({result['setting']}).",
        "",
        "| | dashboard closed | dashboard open |",
        "|---|---|---|",
        f"| proxy CPU s per 1,000 streamed tokens (median of {len(closed)} rounds) | "
        f"{statistics.median(closed):.3f} | {statistics.median(opened):.3f} |",
        f"| proxy CPU during those rounds | {busy(result, 'closed'):.1f} % | "
        f"{busy(result, 'open'):.1f} % |",
        f"| proxy CPU while idle | {result['idle_closed_pct']:.2f} % | "
        f"{result['idle_open_pct']:.2f} % |",
        f"| decode speed seen by the client | {speed(result, 'closed'):.0f} tokens/s | "
        f"{speed(result, 'open'):.0f} tokens/s |",
        "",
        "The page costs the proxy mostly a fixed amount per second (a status poll every "
        "second, a chart read every 5 s, the log streams' checks), so per 1,000 tokens it "
        "shrinks as the model decodes faster: the idle row is the page's own cost.",
        "",
        f"A `/metrics` scrape: {scrape['fresh_ms_median']:.1f} ms when it reads every ready "
        f"model server (their part: {scrape['upstream_scrape_ms_last']:.1f} ms), "
        f"{scrape['cached_ms_median']:.1f} ms from the 2-second cache (medians).",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds per condition")
    parser.add_argument("--requests", type=int, default=8, help="streamed requests per round")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle measurement")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lalo-dashboard-cost-") as tmp, \
            lalo(Path(tmp)) as (url, process):
        rounds = []
        idle_closed = idle_cpu(process, args.idle)
        for index in range(args.rounds):
            rounds.append({"page": "closed", **measure(url, process, args.requests, args.tokens)})
            with dashboard(url, args.chromium):
                if index == 0:
                    time.sleep(2)
                    idle_open = idle_cpu(process, args.idle)
                rounds.append({"page": "open", **measure(url, process, args.requests,
                                                         args.tokens)})
            print(f"round {index + 1}: " + ", ".join(
                f"{r['page']} {r['cpu_s_per_1000_tokens']:.3f}" for r in rounds[-2:]),
                file=sys.stderr)
        scrape = scrape_cost(url)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{psutil.cpu_count()} cores, "
                   f"{psutil.virtual_memory().total / 1024**3:.0f} GiB",
        "setting": f"{args.rounds} rounds x {args.requests} requests x {args.tokens} tokens, "
                   f"idle {args.idle:g} s",
        "rounds": rounds, "idle_closed_pct": idle_closed, "idle_open_pct": idle_open,
        "scrape": scrape,
    }
    text = table(result)
    print(text)
    if not args.no_write:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        doc = DOC.read_text()
        if START in doc and END in doc:
            head, rest = doc.split(START, 1)
            DOC.write_text(head + START + "\n" + text + "\n" + END + rest.split(END, 1)[1])
        print(f"wrote {RESULTS} and {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
