"""The same watch features in Firefox (Debian's firefox-esr over WebDriver BiDi) against one real
`lalo up` with the real SmolLM2: a streamed playground reply, the activity row, the charts'
points, a log stream's new lines, and an inference key's 403 on unload shown on the page."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.integration import test_dashboard_firefox as firefox_tests
from tests.integration.test_dashboard_watch import ADMIN_KEY, APP_KEY, up  # noqa: F401
from tests.support.firefox import Firefox, card, query
from tests.support.lalo import LaloUp

pytestmark = pytest.mark.integration
firefox_path = firefox_tests.firefox_path

UI_TIMEOUT = 15.0
REPLY_TIMEOUT = 180.0
SAMPLE_TIMEOUT = 30.0


@pytest.fixture
def firefox(firefox_path: str) -> Iterator[Firefox]:
    with Firefox(firefox_path, height=1000) as browser:
        yield browser
        assert not browser.errors, f"the page raised: {browser.errors}"


def sign_in(firefox: Firefox, url: str, key: str) -> None:
    firefox.goto(url)
    firefox.evaluate(f"localStorage.setItem('lalo.apiKey', {json.dumps(key)})")
    firefox.reload()
    firefox.wait_for(f"{card('smol')}?.dataset.state", "ready", UI_TIMEOUT)


def set_value(testid: str, value: str) -> str:
    return f"{query(testid)}.value = {json.dumps(value)}"


def test_try_and_watch_smollm2(firefox: Firefox, up: LaloUp) -> None:  # noqa: F811
    sign_in(firefox, up.url, ADMIN_KEY)
    firefox.wait_for(f"{query('playground-model')}.value", "smol", UI_TIMEOUT)
    rows = "document.querySelectorAll('[data-testid=\"activity-row\"]').length"
    before = firefox.evaluate(rows)
    for testid, value in (("playground-system", "You are a helpful assistant."),
                          ("playground-message", "What is the capital of France?"),
                          ("playground-temperature", "0"), ("playground-max-tokens", "24")):
        firefox.evaluate(set_value(testid, value))
    firefox.evaluate(f"{query('playground-send')}.click()")
    firefox.wait_for(f"{query('playground-reply')}.dataset.state", "done", REPLY_TIMEOUT)
    assert "Paris" in firefox.evaluate(f"{query('playground-reply')}.textContent")
    assert firefox.evaluate(f"{query('playground-ttft')}.textContent").endswith("s")
    firefox.wait_for(f"{rows} > {before}", True, UI_TIMEOUT)
    newest = "document.querySelector('[data-testid=\"activity-row\"]')"
    assert firefox.evaluate(f"{newest}.dataset.model") == "smol"
    assert firefox.evaluate(f"{newest}.dataset.status") == "200"

    # charts: every one gets points once the sampler has run
    for kind in ("rps", "tps", "latency", "ram", "queue"):
        firefox.wait_for(f"Number({query('chart-' + kind)}.dataset.points || 0) > 0", True,
                         SAMPLE_TIMEOUT)

    # the model's log streams: a restart's lines arrive without a reload or a poll
    firefox.evaluate(f"{query('logs-toggle', 'smol')}.click()")
    log = f"{query('log', 'smol')}.textContent"
    firefox.wait_for(f"{log}.includes('lalo: ready on')", True, UI_TIMEOUT)
    readies = firefox.evaluate(f"{log}.split('lalo: ready on').length - 1")
    httpx.post(f"{up.url}/api/models/smol/restart", headers=up.headers(), timeout=120)
    firefox.wait_for(f"{log}.split('lalo: ready on').length - 1 > {readies}", True, UI_TIMEOUT * 4)


def test_inference_key_is_refused_unload(firefox: Firefox, up: LaloUp) -> None:  # noqa: F811
    sign_in(firefox, up.url, APP_KEY)
    firefox.evaluate(f"{query('unload', 'smol')}.click()")
    status = f"{query('action-status', 'smol')}.textContent"
    firefox.wait_for(f"{status}.includes('needs an admin key')", True, UI_TIMEOUT)
    assert "inference role" in firefox.evaluate(status)
    assert up.model("smol")["state"] == "ready"
