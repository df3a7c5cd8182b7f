"""No web page let in: the DNS-rebinding requests of issue 14 and a real Chromium page.

A page on the attacker's name that re-points to 127.0.0.1 (DNS rebinding) sends
`Host: attacker.example:PORT`; a page of another origin sends its `Origin`. Both are refused
with 403 by `lalo up` on loopback, and nothing reaches the model.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.support.apt import apt_install
from tests.support.lalo import LaloUp, free_port, lalo_env, wait_until, write_config

pytestmark = pytest.mark.integration

# Without the background-networking flags chromium hangs on a closed network. Chromium's own
# Private Network Access checks are turned off: other browsers have none, and the point is
# that lalo refuses such requests itself.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-features=BlockInsecurePrivateNetworkRequests,PrivateNetworkAccessSendPreflights,"
    "PrivateNetworkAccessRespectPreflightResults,LocalNetworkAccessChecks",
    "--host-resolver-rules=MAP attacker.example 127.0.0.1, MAP evil.example 127.0.0.1",
]
CHAT = '{"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'


@pytest.fixture(scope="module")
def lalo(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path,
         smollm2: Path) -> Iterator[LaloUp]:
    tmp = tmp_path_factory.mktemp("host-guard")
    config = write_config(tmp / "lalo.yaml", {"smol": {"file": str(smollm2), "ctx_size": 1024}},
                          engines={"llama_server": {"path": str(llama_server_bin)}})
    with LaloUp(config, lalo_env(tmp / "state", tmp / "config")) as up:
        up.wait_state("smol", "ready")
        yield up


def chat_requests(lalo: LaloUp) -> float:
    for line in httpx.get(lalo.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith('lalo_requests_total{model="smol",route="chat",status="200"}'):
            return float(line.split()[-1])
    return 0.0


def test_the_rebinding_requests_of_the_issue_are_refused(lalo: LaloUp) -> None:
    # Each answered 200 before (the Origin check compared Origin with the attacker's Host).
    pid = lalo.model("smol")["pid"]
    attacker = f"attacker.example:{lalo.port}"
    status = httpx.get(lalo.url + "/api/status", headers={"host": attacker}, timeout=10)
    assert status.status_code == 403
    assert status.json()["error"]["code"] == "forbidden"
    before = chat_requests(lalo)
    chat = httpx.post(lalo.url + "/v1/chat/completions", content=CHAT, timeout=30,
                      headers={"host": attacker, "content-type": "text/plain"})
    assert chat.status_code == 403
    unload = httpx.post(lalo.url + "/api/models/smol/unload", timeout=30,
                        headers={"host": attacker, "origin": f"http://{attacker}"})
    assert unload.status_code == 403
    for path in ("/health", "/", "/v1/models"):
        assert httpx.get(lalo.url + path, headers={"host": attacker}).status_code == 403
    assert chat_requests(lalo) == before
    model = lalo.model("smol")
    assert (model["state"], model["pid"]) == ("ready", pid)
    # lalo's own names still work
    for host in (f"localhost:{lalo.port}", f"127.0.0.1:{lalo.port}"):
        assert httpx.get(lalo.url + "/api/status", headers={"host": host}).status_code == 200


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = apt_install("chromium")
        path = shutil.which("chromium")
        if path is None:
            pytest.skip(f"chromium is not installed and `apt-get install chromium` failed: {reason}")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS,
                                              headless=True)
        yield launched
        launched.close()


PAGE = b"<!doctype html><title>some page</title><p>nothing to see</p>"


def test_a_rebinding_page_in_chromium_is_refused(lalo: LaloUp, browser: Browser) -> None:
    # The attacker's page was loaded from attacker.example:PORT before the name was re-pointed
    # to 127.0.0.1; its own-origin fetches now reach lalo, and it could read the answers.
    context = browser.new_context()
    page = context.new_page()
    origin = f"http://attacker.example:{lalo.port}"
    page.route(origin + "/", lambda route: route.fulfill(status=200, body=PAGE,
                                                         content_type="text/html"))
    page.goto(origin + "/")
    before = chat_requests(lalo)
    pid = lalo.model("smol")["pid"]
    results = page.evaluate("""async (chat) => {
        const status = await fetch('/api/status');
        const completion = await fetch('/v1/chat/completions',
            {method: 'POST', headers: {'content-type': 'text/plain'}, body: chat});
        const unload = await fetch('/api/models/smol/unload', {method: 'POST'});
        return [status.status, completion.status, unload.status, await status.text()];
    }""", CHAT)
    context.close()
    assert results[:3] == [403, 403, 403], results
    assert "attacker.example" in results[3]
    assert chat_requests(lalo) == before
    assert (lalo.model("smol")["state"], lalo.model("smol")["pid"]) == ("ready", pid)


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def page_server() -> Iterator[int]:
    """A web server of some other site, on loopback (Chromium maps evil.example here)."""
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield port
    server.shutdown()


def test_a_page_of_another_origin_cannot_drive_lalo(lalo: LaloUp, browser: Browser,
                                                    page_server: int) -> None:
    script = """async ([lalo, chat]) => {
        const results = [];
        // a simple request: no preflight, the browser sends it and hides the answer
        try {
            await fetch(lalo + '/v1/chat/completions',
                {method: 'POST', mode: 'no-cors', headers: {'content-type': 'text/plain'},
                 body: chat});
            results.push('sent');
        } catch (e) { results.push('error: ' + e); }
        try {
            const r = await fetch(lalo + '/api/status');
            results.push(r.status);
        } catch (e) { results.push('unreadable'); }
        return results;
    }"""
    pid = lalo.model("smol")["pid"]
    context = browser.new_context()
    page = context.new_page()
    # the control: a page on this machine (localhost) may call lalo; CORS being off, it
    # cannot read the answers, but the request is served
    before = chat_requests(lalo)
    page.goto(f"http://localhost:{page_server}/")
    assert page.evaluate(script, [lalo.url, CHAT]) == ["sent", "unreadable"]
    wait_until(lambda: chat_requests(lalo) == before + 1, 30, message="the control's request")
    # a page of another site: refused by lalo (403), so the chat never reached the model
    page.goto(f"http://evil.example:{page_server}/")
    assert page.evaluate(script, [lalo.url, CHAT]) == ["sent", "unreadable"]
    unload = page.evaluate("""async (lalo) => {
        await fetch(lalo + '/api/models/smol/unload', {method: 'POST', mode: 'no-cors'});
        return 'sent';
    }""", lalo.url)
    assert unload == "sent"
    context.close()
    assert chat_requests(lalo) == before + 1
    assert (lalo.model("smol")["state"], lalo.model("smol")["pid"]) == ("ready", pid)
