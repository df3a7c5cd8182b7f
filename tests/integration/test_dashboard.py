"""The dashboard in a real browser (Debian's chromium through Playwright) against the real
`lalo up` with real llama-server children: states, live updates, actions, logs, the key prompt."""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from tests.support.apt import apt_install
from tests.support.lalo import FAST_SUPERVISOR, LaloUp, write_config

pytestmark = pytest.mark.integration

# Without the background-networking flags chromium hangs on a closed network.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
LOAD_TIMEOUT = 120_000  # ms for a model server to come up on a busy 2-core machine
UI_TIMEOUT = 15_000     # ms for the page to reflect a change (it polls every second)
API_KEY = "dashboard-test-key"


def _find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    found = _find_chromium()
    if found is None:
        reason = apt_install("chromium")
        found = _find_chromium()
        if found is None:
            pytest.skip(f"chromium is not installed and `apt-get install chromium` failed: {reason}")
    return found


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS,
                                              headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (empty localStorage) at 1280x800; fails on any script error."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert not errors, f"the page raised: {errors}"


def lalo_config(tmp_path: Path, server: Path, models: dict[str, dict[str, object]], *,
                supervisor: dict[str, float] | None = None, **sections: object) -> Path:
    return write_config(tmp_path / "lalo.yaml", models,
                        engines={"llama_server": {"path": str(server)}},
                        supervisor={**FAST_SUPERVISOR, **(supervisor or {})}, **sections)


def two_models(small_model: Path, small_model_b: Path) -> dict[str, dict[str, object]]:
    return {
        "a": {"file": str(small_model), "ctx_size": 512},
        "b": {"file": str(small_model_b), "ctx_size": 512, "aliases": ["bee"]},
    }


def card(page: Page, name: str) -> Locator:
    return page.locator(f'[data-testid="model-card"][data-model="{name}"]')


def expect_state(page: Page, name: str, state: str, timeout: float = LOAD_TIMEOUT) -> None:
    expect(card(page, name)).to_have_attribute("data-state", state, timeout=timeout)


def test_page_shows_two_models_ready(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
    small_model: Path, small_model_b: Path, page: Page,
) -> None:
    config = lalo_config(tmp_path, llama_server_bin, two_models(small_model, small_model_b))
    with LaloUp(config, isolated) as up:
        elsewhere: list[str] = []
        page.on("request", lambda request: None if request.url.startswith(up.url + "/")
                else elsewhere.append(request.url))
        page.goto(up.url)
        expect_state(page, "a", "ready")
        expect_state(page, "b", "ready")
        expect(page.get_by_test_id("connection")).to_have_attribute("data-state", "live")
        expect(page.get_by_test_id("health-line")).to_have_text("2 of 2 models ready",
                                                                timeout=UI_TIMEOUT)
        status = up.status()
        expect(page.get_by_test_id("version")).to_have_text(f"v{status['version']}")
        expect(page.get_by_test_id("models-summary")).to_have_text("2 ready")
        expect(page.get_by_test_id("ram-bar")).to_be_visible()
        for model in status["models"]:
            shown = card(page, model["name"])
            expect(shown.get_by_test_id("state")).to_have_text("ready")
            expect(shown.get_by_test_id("engine")).to_have_text("llama-server")
            expect(shown.get_by_test_id("pid")).to_have_text(str(model["pid"]))
            expect(shown.get_by_test_id("port")).to_have_text(str(model["port"]))
            expect(shown.get_by_test_id("restarts")).to_have_text("0")
            expect(shown.get_by_test_id("ram")).to_contain_text("est.")
            expect(page.locator(f'[data-testid="ram-segment"][data-model="{model["name"]}"]')) \
                .to_have_count(1)
        expect(card(page, "b").get_by_test_id("aliases")).to_contain_text("bee")

        # a completion shows up as a request, a tokens/s figure and a sparkline point
        reply = httpx.post(up.url + "/v1/completions", timeout=120, json={
            "model": "a", "prompt": "hello", "max_tokens": 8, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        a = card(page, "a")
        expect(a.get_by_test_id("requests")).to_have_text("1", timeout=UI_TIMEOUT)
        expect(a.get_by_test_id("tokens-per-s")).to_have_text(re.compile(r"^\d+\.\d$"))
        expect(a.get_by_test_id("sparkline")).to_have_attribute("data-points", "1")

        # at 400 px the cards stack and nothing scrolls sideways
        page.set_viewport_size({"width": 400, "height": 800})
        expect(card(page, "b")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 400
        assert elsewhere == [], f"the page reached beyond lalo: {elsewhere}"


def test_kill_9_shows_restarting_then_ready_without_reload(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
    small_model: Path, small_model_b: Path, page: Page,
) -> None:
    # a 3 s backoff keeps the "restarting" phase on screen for several polls
    config = lalo_config(tmp_path, llama_server_bin, two_models(small_model, small_model_b),
                         supervisor={"backoff_initial": 3.0, "backoff_max": 6.0})
    with LaloUp(config, isolated) as up:
        page.goto(up.url)
        expect_state(page, "a", "ready")
        expect_state(page, "b", "ready")
        page.evaluate("window.sameDocument = true")
        before = up.model("a")["pid"]
        other = up.model("b")["pid"]
        a = card(page, "a")
        expect(a.get_by_test_id("pid")).to_have_text(str(before), timeout=UI_TIMEOUT)

        os.kill(before, signal.SIGKILL)
        expect_state(page, "a", "restarting", timeout=UI_TIMEOUT)
        expect(a.get_by_test_id("state")).to_contain_text("restarting in")
        expect(a.get_by_test_id("last-error")).to_contain_text("SIGKILL")
        expect_state(page, "a", "ready")
        after = up.model("a")["pid"]
        assert after != before
        expect(a.get_by_test_id("pid")).to_have_text(str(after), timeout=UI_TIMEOUT)
        expect(a.get_by_test_id("restarts")).to_have_text(re.compile(r"^1\b"))
        expect(card(page, "b").get_by_test_id("pid")).to_have_text(str(other))
        expect(card(page, "b").get_by_test_id("restarts")).to_have_text("0")
        assert page.evaluate("window.sameDocument") is True  # updated in place, never reloaded


def test_unload_then_load_with_the_log_following(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
    small_model: Path, small_model_b: Path, page: Page,
) -> None:
    config = lalo_config(tmp_path, llama_server_bin, two_models(small_model, small_model_b))
    with LaloUp(config, isolated) as up:
        page.goto(up.url)
        expect_state(page, "a", "ready")
        a = card(page, "a")
        first = up.model("a")["pid"]
        expect(a.get_by_test_id("load")).to_be_disabled()

        a.get_by_test_id("logs-toggle").click()
        expect(a.get_by_test_id("logs-toggle")).to_have_attribute("aria-expanded", "true")
        log = a.get_by_test_id("log")
        expect(log).to_contain_text("--- lalo: ready on", timeout=UI_TIMEOUT)

        a.get_by_test_id("unload").click()
        expect_state(page, "a", "stopped", timeout=UI_TIMEOUT * 2)
        expect(a.get_by_test_id("pid")).to_have_text("—")
        expect(a.get_by_test_id("port")).to_have_text("—")
        expect(page.locator('[data-testid="ram-segment"][data-model="a"]')).to_have_count(0)
        expect(a.get_by_test_id("unload")).to_be_disabled()
        # the open log follows: lalo's own note about the stop appears without reopening it
        expect(log).to_contain_text("--- lalo: stopping: unload requested", timeout=UI_TIMEOUT)
        assert up.model("b")["state"] == "ready"

        a.get_by_test_id("load").click()
        expect_state(page, "a", "ready")
        second = up.model("a")["pid"]
        assert second != first
        expect(a.get_by_test_id("pid")).to_have_text(str(second), timeout=UI_TIMEOUT)
        expect(log).to_contain_text(f"(pid {second})", timeout=UI_TIMEOUT)
        at_end = page.evaluate(
            "(el) => el.scrollHeight - el.scrollTop - el.clientHeight < 8", log.element_handle())
        assert at_end, "a followed log stays scrolled to its newest line"


def test_failed_model_shows_its_reason_and_restarts(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
    small_model: Path, corrupt_model: Path, page: Page,
) -> None:
    broken = tmp_path / "broken.gguf"
    shutil.copyfile(corrupt_model, broken)
    config = lalo_config(tmp_path, llama_server_bin, {
        "good": {"file": str(small_model), "ctx_size": 512},
        "broken": {"file": str(broken), "ctx_size": 512},
    })
    with LaloUp(config, isolated) as up:
        page.goto(up.url)
        expect_state(page, "good", "ready")
        expect_state(page, "broken", "failed")
        failed = card(page, "broken")
        expect(failed.get_by_test_id("state")).to_have_text("failed")
        expect(failed.get_by_test_id("last-error")).to_contain_text("truncated GGUF file")
        expect(failed.get_by_test_id("last-error-box")).to_be_visible()
        restart = failed.get_by_test_id("restart")
        expect(restart).to_be_enabled()
        expect(restart).to_have_class(re.compile(r"\bprimary\b"))
        expect(failed.get_by_test_id("load")).to_be_disabled()
        expect(page.get_by_test_id("health-line")).to_have_text("1 of 2 models ready")
        expect(page.get_by_test_id("models-summary")).to_have_text("1 ready · 1 failed")

        # someone replaces the broken file; the restart button brings the model up
        shutil.copyfile(small_model, broken)
        restart.click()
        expect_state(page, "broken", "ready")
        expect(failed.get_by_test_id("state")).to_have_text("ready")
        expect(page.get_by_test_id("health-line")).to_have_text("2 of 2 models ready",
                                                                timeout=UI_TIMEOUT)


def test_key_prompt_guards_everything_but_the_health_line(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
    small_model: Path, page: Page,
) -> None:
    config = lalo_config(tmp_path, llama_server_bin,
                         {"a": {"file": str(small_model), "ctx_size": 512}},
                         proxy={"api_keys": [API_KEY]})
    with LaloUp(config, isolated) as up:
        page.goto(up.url)
        prompt = page.get_by_test_id("key-prompt")
        expect(prompt).to_be_visible(timeout=UI_TIMEOUT)
        expect(page.get_by_test_id("health-line")).to_have_text(re.compile(r"^\d of 1 models ready$"))
        expect(page.get_by_test_id("overview")).to_be_hidden()
        expect(page.get_by_test_id("model-card")).to_have_count(0)

        page.get_by_label("API key", exact=True).fill("wrong-key")
        page.get_by_test_id("key-submit").click()
        expect(page.get_by_test_id("key-error")).to_contain_text("refused", timeout=UI_TIMEOUT)
        expect(page.get_by_test_id("model-card")).to_have_count(0)

        page.get_by_label("API key", exact=True).fill(API_KEY)
        page.get_by_test_id("key-submit").click()
        expect_state(page, "a", "ready")
        expect(prompt).to_be_hidden()
        assert page.evaluate("localStorage.getItem('lalo.apiKey')") == API_KEY

        # the key is kept: a reload goes straight to the models
        page.reload()
        expect_state(page, "a", "ready", timeout=UI_TIMEOUT)
        expect(prompt).to_be_hidden()
        # and it goes with the admin actions too
        card(page, "a").get_by_test_id("unload").click()
        expect_state(page, "a", "stopped", timeout=UI_TIMEOUT * 2)

        page.get_by_test_id("forget-key").click()
        expect(prompt).to_be_visible(timeout=UI_TIMEOUT)
        expect(page.get_by_test_id("model-card")).to_have_count(0)
        assert page.evaluate("localStorage.getItem('lalo.apiKey')") is None


def test_lost_connection_is_shown_and_the_page_reconnects(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
    small_model: Path, page: Page,
) -> None:
    config = lalo_config(tmp_path, llama_server_bin,
                         {"a": {"file": str(small_model), "ctx_size": 512}})
    first = LaloUp(config, isolated).start()
    try:
        page.goto(first.url)
        expect_state(page, "a", "ready")
        connection = page.get_by_test_id("connection")
        expect(connection).to_have_attribute("data-state", "live")
        first.stop()
        expect(connection).to_have_attribute("data-state", "lost", timeout=UI_TIMEOUT)
        expect(connection).to_contain_text("lost")
        expect(connection).to_have_attribute("aria-live", "polite")
    finally:
        first.stop()
    with LaloUp(config, isolated, port=first.port) as again:
        expect(connection).to_have_attribute("data-state", "live", timeout=LOAD_TIMEOUT)
        expect_state(page, "a", "ready")
        expect(card(page, "a").get_by_test_id("pid")).to_have_text(str(again.model("a")["pid"]),
                                                                   timeout=UI_TIMEOUT)
