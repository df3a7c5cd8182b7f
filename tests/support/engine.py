"""Which engine the integration tests run: LALO_TEST_ENGINE_VARIANT (native | portable) if set,
else the portable one if it is already built in the Debian 11 root (one engine serves the
tests and the packages), else the native one. A fresh CI machine builds only the native one:
the portable build in its root (with CPython for the frozen lalo) costs 20-30 minutes more on
2 cores, which CI's hour cannot spare; `tests/integration/test_old_linux.py` builds and tests
it when asked. The portable engine decoded at 1.07x the native one here (SmolLM2, 4
alternating rounds of 128 tokens, a partly busy machine: bench/engine_variants.py,
docs/packaging.md); benchmarks keep the native one."""

from __future__ import annotations

import os

from launcher.engines.registry import cached_engines
from launcher.engines.source import SDIST_LABEL


def test_engine_variant() -> str:
    chosen = os.environ.get("LALO_TEST_ENGINE_VARIANT")
    if chosen:
        return chosen
    return "portable" if portable_in_root_built() else "native"


def portable_in_root_built() -> bool:
    """The portable engine made in the Debian 11 build root is in the cache."""
    return any(m.variant == "portable" and m.source == SDIST_LABEL and "build_root" in m.extra
               for _, m in cached_engines())


def engine_built(variant: str) -> bool:
    return any(m.variant == variant and m.source == SDIST_LABEL for _, m in cached_engines())


test_engine_variant.__test__ = False  # type: ignore[attr-defined]  # not a test: a helper
