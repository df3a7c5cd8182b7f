"""The dashboard's peers table (GET /api/status "peers") in a real browser: one peer up (the
lalo itself, asked as a peer), one down (nobody listens at its address)."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.integration.test_dashboard import (  # noqa: F401 - fixtures used by name
    LOAD_TIMEOUT,
    UI_TIMEOUT,
    browser,
    chromium_path,
    lalo_config,
    page,
)
from tests.support.lalo import LaloUp, free_port

pytestmark = pytest.mark.integration


def test_peers_table_shows_each_peer_and_its_state(
    tmp_path: Path, isolated: dict[str, str], llama_server_bin: Path, small_model: Path,
    page: Page,  # noqa: F811 - the fixture imported above
) -> None:
    port = free_port()
    gone = free_port()  # nothing listens there
    checks = {"health_interval": 0.3, "health_timeout": 1.0, "max_failures": 1}
    config = lalo_config(tmp_path, llama_server_bin, {"a": {"file": str(small_model)}},
                         peers={"itself": {"url": f"http://127.0.0.1:{port}", **checks},
                                "gone": {"url": f"http://127.0.0.1:{gone}", **checks}})
    with LaloUp(config, isolated, port=port) as up:
        page.goto(up.url)
        rows = page.get_by_test_id("peer")
        expect(rows).to_have_count(2, timeout=LOAD_TIMEOUT)
        itself, down = rows.nth(0), rows.nth(1)
        expect(itself).to_contain_text("itself")
        expect(itself.locator("td").nth(2)).to_have_text("up", timeout=UI_TIMEOUT)
        expect(itself.locator("td").nth(3)).to_have_text("a")
        expect(down.locator("td").nth(2)).to_have_text("down", timeout=UI_TIMEOUT)
        expect(down).to_contain_text(f"127.0.0.1:{gone}")
