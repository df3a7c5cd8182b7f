"""Debian's Firefox ESR driven over WebDriver BiDi, the W3C protocol Firefox speaks natively.

Playwright drives only its own patched Firefox builds, which cannot be downloaded here; the
stock browser needs nothing but `--remote-debugging-port` and a websocket. This is the small
part of BiDi the dashboard tests use: navigate, evaluate a script, set the viewport, and
collect the page's JavaScript errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

# A quiet profile: no first-run pages, updates, telemetry or safe-browsing lookups, which
# would only hang on a closed network.
PREFS = {
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.enabled": False,
    "extensions.update.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "network.proxy.type": 0,
}
START_TIMEOUT = 60.0
_LISTENING = re.compile(r"WebDriver BiDi listening on (ws://\S+)")


class BiDiError(RuntimeError):
    pass


class Firefox:
    """One headless Firefox with one tab; use as a context manager."""

    def __init__(self, executable: str, width: int = 1280, height: int = 800) -> None:
        self._profile = Path(tempfile.mkdtemp(prefix="lalo-firefox-"))
        (self._profile / "user.js").write_text("".join(
            f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in PREFS.items()))
        self._proc = subprocess.Popen(
            [executable, "--headless", "--no-remote", "--profile", str(self._profile),
             "--remote-debugging-port", "0"],
            env={**os.environ, "HOME": str(self._profile), "MOZ_HEADLESS": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.errors: list[str] = []  # JavaScript errors the page raised
        self._next_id = 0
        self._closing = contextlib.ExitStack()
        try:
            self._ws = self._closing.enter_context(connect(
                self._wait_for_endpoint() + "/session", max_size=None, open_timeout=START_TIMEOUT))
            self._call("session.new", {"capabilities": {}})
            self._call("session.subscribe", {"events": ["log.entryAdded"]})
            self.context = self._call("browsingContext.getTree", {})["contexts"][0]["context"]
            self.set_viewport(width, height)
        except BaseException:
            self.close()
            raise

    def _wait_for_endpoint(self) -> str:
        found: list[str] = []
        seen: list[str] = []
        assert self._proc.stdout is not None
        stdout = self._proc.stdout

        def read() -> None:
            for line in stdout:
                seen.append(line.rstrip())
                match = _LISTENING.search(line)
                if match and not found:
                    found.append(match.group(1))
            # keep draining so that Firefox never blocks on a full pipe

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while not found:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise BiDiError("firefox did not start its BiDi endpoint: " + " | ".join(seen[-5:]))
            time.sleep(0.05)
        return found[0]

    def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._next_id += 1
        me = self._next_id
        self._ws.send(json.dumps({"id": me, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=START_TIMEOUT))
            if message.get("method") == "log.entryAdded":
                entry = message["params"]
                if entry.get("type") == "javascript" and entry.get("level") == "error":
                    self.errors.append(str(entry.get("text")))
                continue
            if message.get("id") != me:
                continue
            if message.get("type") == "error":
                raise BiDiError(f"{method}: {message.get('error')}: {message.get('message')}")
            result: dict[str, Any] = message["result"]
            return result

    def goto(self, url: str) -> None:
        self._call("browsingContext.navigate",
                   {"context": self.context, "url": url, "wait": "complete"})

    def reload(self) -> None:
        self._call("browsingContext.reload", {"context": self.context, "wait": "complete"})

    def set_viewport(self, width: int, height: int) -> None:
        self._call("browsingContext.setViewport",
                   {"context": self.context, "viewport": {"width": width, "height": height}})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited); primitives and null only."""
        reply = self._call("script.evaluate", {
            "expression": expression, "target": {"context": self.context},
            "awaitPromise": True, "resultOwnership": "none",
        })
        if reply.get("type") == "exception":
            details = reply.get("exceptionDetails", {})
            raise BiDiError(f"{expression!r} threw: {details.get('text')}")
        value = reply["result"]
        if value["type"] in ("undefined", "null"):
            return None
        if value["type"] in ("string", "number", "boolean"):
            return value["value"]
        raise BiDiError(f"{expression!r} gave a {value['type']}; return a primitive")

    def wait_for(self, expression: str, expected: Any = True, timeout: float = 15.0) -> None:
        """Poll `expression` until it equals `expected`; fail with the last value seen."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = self.evaluate(expression)
            if last == expected:
                return
            time.sleep(0.1)
        raise AssertionError(f"{expression} stayed {last!r}, wanted {expected!r} ({timeout:g} s)")

    def close(self) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            try:
                self._call("session.end", {})
            except Exception:  # closing a browser that may be gone already
                pass
            self._closing.close()
        self._proc.terminate()
        try:
            self._proc.wait(15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Firefox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def query(testid: str, model: str | None = None) -> str:
    """JavaScript for the element with data-testid `testid` (inside that model's card)."""
    selector = f'[data-testid="{testid}"]'
    if model is not None:
        selector = f'[data-testid="model-card"][data-model="{model}"] {selector}'
    return f"document.querySelector({json.dumps(selector)})"


def card(model: str) -> str:
    """JavaScript for that model's card element."""
    selector = f'[data-testid="model-card"][data-model="{model}"]'
    return f"document.querySelector({json.dumps(selector)})"
