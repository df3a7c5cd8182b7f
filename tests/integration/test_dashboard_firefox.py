"""The dashboard in Firefox (Debian's firefox-esr over WebDriver BiDi) against the real `lalo up`:
the same page the Chromium tests drive, checked for what differs most between engines —
rendering of the live cards, the narrow layout, the admin buttons and the key prompt."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_dashboard import API_KEY, lalo_config, two_models
from tests.support.apt import apt_install
from tests.support.firefox import Firefox, card, query
from tests.support.lalo import LaloUp

pytestmark = pytest.mark.integration

LOAD_TIMEOUT = 120.0  # seconds for a model server to come up on a busy 2-core machine
UI_TIMEOUT = 15.0     # seconds for the page to reflect a change (it polls every second)


@pytest.fixture(scope="session")
def firefox_path() -> str:
    found = shutil.which("firefox-esr") or shutil.which("firefox")
    if found is None:
        reason = apt_install("firefox-esr")
        found = shutil.which("firefox-esr")
        if found is None:
            pytest.skip(f"firefox is not installed and `apt-get install firefox-esr` failed: {reason}")
    return found


@pytest.fixture
def firefox(firefox_path: str) -> Iterator[Firefox]:
    with Firefox(firefox_path) as browser:
        yield browser
        assert not browser.errors, f"the page raised: {browser.errors}"


def state_of(model: str) -> str:
    return f"{card(model)}?.dataset.state"


def test_cards_live_narrow_layout_and_admin_buttons(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
    small_model: Path, small_model_b: Path, firefox: Firefox,
) -> None:
    config = lalo_config(tmp_path, llama_server_bin, two_models(small_model, small_model_b))
    with LaloUp(config, isolated) as up:
        firefox.goto(up.url)
        assert "Firefox/" in firefox.evaluate("navigator.userAgent")
        firefox.wait_for(state_of("a"), "ready", LOAD_TIMEOUT)
        firefox.wait_for(state_of("b"), "ready", LOAD_TIMEOUT)
        firefox.wait_for(f"{query('health-line')}.textContent", "2 of 2 models ready", UI_TIMEOUT)
        firefox.wait_for(f"{query('connection')}.dataset.state", "live", UI_TIMEOUT)
        status = up.status()
        for model in status["models"]:
            name = model["name"]
            firefox.wait_for(f"{query('pid', name)}.textContent", str(model["pid"]), UI_TIMEOUT)
            assert firefox.evaluate(f"{query('engine', name)}.textContent") == "llama-server"
        assert "bee" in firefox.evaluate(f"{query('aliases', 'b')}.textContent")
        # the RAM bar is drawn with one segment per running model
        assert firefox.evaluate(
            "document.querySelectorAll('[data-testid=\"ram-segment\"]').length") == 2
        assert firefox.evaluate(f"{query('ram-bar')}.getBoundingClientRect().width") > 100

        # at 400 px the cards stack and nothing scrolls sideways
        firefox.set_viewport(400, 800)
        firefox.wait_for("document.documentElement.scrollWidth <= 400", True, UI_TIMEOUT)
        width_a = firefox.evaluate(f"{card('a')}.getBoundingClientRect().width")
        assert 300 <= width_a <= 400

        # unload, then load again, with the buttons
        firefox.evaluate(f"{query('unload', 'a')}.click()")
        firefox.wait_for(state_of("a"), "stopped", UI_TIMEOUT * 2)
        assert up.model("a")["state"] == "stopped"
        assert firefox.evaluate(f"{query('load', 'a')}.disabled") is False
        firefox.evaluate(f"{query('load', 'a')}.click()")
        firefox.wait_for(state_of("a"), "ready", LOAD_TIMEOUT)
        assert up.model("b")["state"] == "ready"


def test_key_prompt_then_models(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path,
    small_model: Path, firefox: Firefox,
) -> None:
    config = lalo_config(tmp_path, llama_server_bin,
                         {"a": {"file": str(small_model), "ctx_size": 512}},
                         proxy={"api_keys": [API_KEY]})
    with LaloUp(config, isolated) as up:
        firefox.goto(up.url)
        firefox.wait_for(f"{query('key-prompt')}.hidden", False, UI_TIMEOUT)
        assert firefox.evaluate("document.querySelectorAll('[data-testid=\"model-card\"]').length") == 0

        firefox.evaluate(f"{query('key-input')}.value = 'wrong-key'")
        firefox.evaluate(f"{query('key-submit')}.click()")
        firefox.wait_for(f"({query('key-error')}.textContent || '').includes('refused')", True,
                         UI_TIMEOUT)

        firefox.evaluate(f"{query('key-input')}.value = {API_KEY!r}")
        firefox.evaluate(f"{query('key-submit')}.click()")
        firefox.wait_for(state_of("a"), "ready", LOAD_TIMEOUT)
        assert firefox.evaluate(f"{query('key-prompt')}.hidden") is True
        assert firefox.evaluate("localStorage.getItem('lalo.apiKey')") == API_KEY
        firefox.reload()  # the key is kept: straight to the models
        firefox.wait_for(state_of("a"), "ready", UI_TIMEOUT)
        assert firefox.evaluate(f"{query('key-prompt')}.hidden") is True
