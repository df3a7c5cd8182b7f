"""Which engine the integration tests run: LALO_TEST_ENGINE_VARIANT (native | portable) if set,
else the portable one where it can be built (root, debootstrap: it is built in a Debian 11 root)
so that one build serves the tests and the packages, else the native one. The portable engine
decoded at 1.07x the native one here (SmolLM2, 4 alternating rounds of 128 tokens, a partly
busy machine: bench/engine_variants.py, docs/packaging.md); benchmarks keep the native one."""

from __future__ import annotations

import os
import shutil
import sys

from launcher.engines.registry import cached_engines
from launcher.engines.source import SDIST_LABEL


def test_engine_variant() -> str:
    chosen = os.environ.get("LALO_TEST_ENGINE_VARIANT")
    if chosen:
        return chosen
    can_build = (sys.platform.startswith("linux") and os.geteuid() == 0
                 and shutil.which("debootstrap") is not None)
    built = any(m.variant == "portable" and m.source == SDIST_LABEL and "build_root" in m.extra
                for _, m in cached_engines())
    return "portable" if can_build or built else "native"


def engine_built(variant: str) -> bool:
    return any(m.variant == variant and m.source == SDIST_LABEL for _, m in cached_engines())


test_engine_variant.__test__ = False  # type: ignore[attr-defined]  # not a test: a helper
