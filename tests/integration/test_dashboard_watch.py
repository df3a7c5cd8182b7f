"""Trying and watching models from the dashboard in Chromium, against one real `lalo up` with
the real SmolLM2-135M-Instruct: the playground streams a real reply, the activity list shows
that request, the charts fill with samples, a model's log streams new lines, per-key and
llama-server metrics reach /metrics, and an inference-role key is refused (403) on unload
with the page saying so."""

from __future__ import annotations

import contextlib
import re
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.integration import test_dashboard as chromium
from tests.integration.test_dashboard import UI_TIMEOUT, card
from tests.support.lalo import FAST_SUPERVISOR, LaloUp, lalo_env, write_config

pytestmark = pytest.mark.integration
chromium_path = chromium.chromium_path  # the same Debian chromium, one browser per module
browser = chromium.browser

ADMIN_KEY = "sk-watch-ops"
APP_KEY = "sk-watch-app"
REPLY_TIMEOUT = 180_000  # ms for a streamed reply on a busy 2-core machine
SAMPLE_TIMEOUT = 30_000  # ms for the first chart sample (taken every 5 s)


class KeyedLaloUp(LaloUp):
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path,
       smollm2: Path) -> Iterator[LaloUp]:
    """One lalo for the module: SmolLM2 ready, an admin and an inference key."""
    base = tmp_path_factory.mktemp("watch")
    config = write_config(
        base / "lalo.yaml", {"smol": {"file": str(smollm2), "ctx_size": 1024}},
        engines={"llama_server": {"path": str(llama_server_bin)}}, supervisor=FAST_SUPERVISOR,
        proxy={"api_keys": [{"key": ADMIN_KEY, "name": "ops", "role": "admin"},
                            {"key": APP_KEY, "name": "backend", "role": "inference"}]})
    with KeyedLaloUp(config, lalo_env(base / "state", base / "config")) as running:
        running.wait_state("smol", "ready", 120)
        yield running


def open_page(browser: Browser, url: str, key: str) -> tuple[Page, list[str]]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.add_init_script(f"localStorage.setItem('lalo.apiKey', {key!r})")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    expect(card(page, "smol")).to_have_attribute("data-state", "ready", timeout=UI_TIMEOUT)
    return page, errors


@pytest.fixture
def admin_page(browser: Browser, up: LaloUp) -> Iterator[Page]:
    page, errors = open_page(browser, up.url, ADMIN_KEY)
    yield page
    page.context.close()
    assert not errors, f"the page raised: {errors}"


@pytest.fixture
def app_page(browser: Browser, up: LaloUp) -> Iterator[Page]:
    page, errors = open_page(browser, up.url, APP_KEY)
    yield page
    page.context.close()
    assert not errors, f"the page raised: {errors}"


def test_playground_streams_a_real_reply_and_activity_shows_it(admin_page: Page,
                                                                up: LaloUp) -> None:
    page = admin_page
    expect(page.get_by_test_id("playground-model")).to_have_value("smol")
    page.get_by_test_id("playground-system").fill("You are a helpful assistant.")
    page.get_by_test_id("playground-message").fill("What is the capital of France?")
    page.get_by_test_id("playground-temperature").fill("0")
    page.get_by_test_id("playground-max-tokens").fill("24")
    before = len(page.get_by_test_id("activity-row").all())
    page.get_by_test_id("playground-send").click()
    # the reply streams in: the first token shows before the answer is complete
    expect(page.locator("#pg-reply")).to_have_attribute(
        "data-state", re.compile("streaming|done"), timeout=REPLY_TIMEOUT)
    expect(page.locator("#pg-reply")).to_have_attribute("data-state", "done",
                                                        timeout=REPLY_TIMEOUT)
    expect(page.get_by_test_id("playground-reply")).to_contain_text("Paris")
    expect(page.get_by_test_id("playground-ttft")).to_have_text(re.compile(r"^\d+(\.\d+)? m?s$"))
    expect(page.get_by_test_id("playground-tps")).to_have_text(re.compile(r"^\d+\.\d$"))

    rows = page.get_by_test_id("activity-row")
    expect(rows).to_have_count(before + 1, timeout=UI_TIMEOUT)
    newest = rows.first
    expect(newest).to_have_attribute("data-model", "smol")
    expect(newest).to_have_attribute("data-status", "200")
    expect(newest).to_contain_text("ops")  # the key's name, never the key

    answer = httpx.get(f"{up.url}/api/activity?model=smol&status=2xx&n=1",
                       headers=up.headers(), timeout=10).json()["requests"][0]
    assert answer["key"] == "ops" and answer["ttft"] is not None
    assert answer["completion_tokens"] and answer["prompt_tokens"]
    metrics = httpx.get(f"{up.url}/metrics", headers=up.headers(), timeout=10).text
    assert re.search(r'^lalo_key_requests_total\{key="ops"\} [1-9]', metrics, re.M)
    # llama-server's own metrics, under their own names, with the model's name
    assert re.search(r'^llamacpp:tokens_predicted_total\{model="smol"\} [1-9]', metrics, re.M)


def test_charts_get_points(admin_page: Page) -> None:
    page = admin_page
    for kind in ("rps", "tps", "latency", "ram", "queue"):
        chart = page.get_by_test_id(f"chart-{kind}")
        expect(chart).to_have_attribute("data-points", re.compile(r"^[1-9]\d*$"),
                                        timeout=SAMPLE_TIMEOUT if kind == "rps" else UI_TIMEOUT)
        assert chart.locator("polyline.series").count() >= 1
    expect(page.get_by_test_id("chart-legend")).to_contain_text("smol")


def test_a_log_stream_shows_new_lines(admin_page: Page, up: LaloUp) -> None:
    page = admin_page
    shown = card(page, "smol")
    shown.get_by_test_id("logs-toggle").click()
    expect(shown.get_by_test_id("logs-info")).to_contain_text("following", timeout=UI_TIMEOUT)
    log = shown.get_by_test_id("log")
    expect(log).to_contain_text("lalo: ready on", timeout=UI_TIMEOUT)  # the backlog
    readies = (log.text_content() or "").count("lalo: ready on")
    # something new happens to the model: its log grows while the page only listens
    httpx.post(f"{up.url}/api/models/smol/restart", headers=up.headers(), timeout=120)
    page.wait_for_function(
        "([selector, before]) => document.querySelector(selector).textContent"
        ".split('lalo: ready on').length - 1 > before",
        arg=['[data-model="smol"] [data-testid="log"]', readies], timeout=UI_TIMEOUT * 4)
    expect(log).to_contain_text("lalo: stopping")
    expect(card(page, "smol")).to_have_attribute("data-state", "ready", timeout=UI_TIMEOUT)
    # lalo's own log streams too
    page.get_by_test_id("lalo-log-toggle").click()
    expect(page.get_by_test_id("lalo-log-text")).to_contain_text("smol: ", timeout=UI_TIMEOUT)


def test_an_inference_key_cannot_unload_and_the_page_says_so(app_page: Page, up: LaloUp) -> None:
    page = app_page
    shown = card(page, "smol")
    shown.get_by_test_id("unload").click()
    status = shown.get_by_test_id("action-status")
    expect(status).to_contain_text("Not allowed", timeout=UI_TIMEOUT)
    expect(status).to_contain_text("'backend' has the inference role")
    expect(status).to_contain_text("needs an admin key")
    assert up.model("smol")["state"] == "ready"
    refused = httpx.post(f"{up.url}/api/models/smol/unload",
                         headers={"authorization": f"Bearer {APP_KEY}"}, timeout=10)
    assert refused.status_code == 403
    # the request history is an admin's: the page says why it is empty
    expect(page.get_by_test_id("activity-note")).to_contain_text("needs an admin key",
                                                                 timeout=UI_TIMEOUT)


def test_open_log_streams_do_not_hold_up_stopping_and_activity_is_kept(
        tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
        small_model: Path) -> None:
    """A dashboard left open follows logs forever: lalo's stop ends those streams at once
    instead of waiting out stop_timeout (30 s here) for them as for requests in flight. With
    `activity.store`, the requests are in the SQLite file after the stop."""
    config = write_config(tmp_path / "lalo.yaml", {"a": {"file": str(small_model),
                                                          "ctx_size": 512}},
                          engines={"llama_server": {"path": str(llama_server_bin)}},
                          supervisor={**FAST_SUPERVISOR, "stop_timeout": 30.0},
                          proxy={"activity": {"store": True, "store_max_size": "2MiB"}})
    with LaloUp(config, isolated) as lalo:
        lalo.wait_state("a", "ready", 120)
        for _ in range(3):
            httpx.post(f"{lalo.url}/v1/completions", timeout=60, json={
                "model": "a", "prompt": "hello", "max_tokens": 4}).raise_for_status()
        streams = [httpx.stream("GET", f"{lalo.url}{path}", timeout=60)
                   for path in ("/api/models/a/logs/stream?n=5", "/api/logs/stream?n=5")]
        opened = [stream.__enter__() for stream in streams]
        try:
            for response in opened:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                first = next(response.iter_lines())
                assert first.startswith(("data: ", ": following"))
            started = time.monotonic()
            lalo.signal(signal.SIGTERM)
            assert lalo.wait(60) == 0
            assert time.monotonic() - started < 15, "the log streams held up the stop"
            store = Path(isolated["LALO_STATE_DIR"]) / "activity.sqlite"
            with contextlib.closing(sqlite3.connect(store)) as db:
                rows = db.execute("SELECT model, route, status, completion_tokens "
                                  "FROM activity").fetchall()
            assert rows == [("a", "completions", 200, 4)] * 3
        finally:
            for stream in streams:
                with contextlib.suppress(httpx.HTTPError):
                    stream.__exit__(None, None, None)
