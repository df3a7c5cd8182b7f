"""pytest collects tests/unit and tests/integration as rootdir-relative modules: two test files
with one basename make collection fail ("import file mismatch") and CI runs nothing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_modules_have_unique_basenames() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert not [name for name, count in names.items() if count > 1]


def test_integration_modules_that_run_processes_are_marked_integration() -> None:
    # `pytest -m "not integration"` (the README's fast unit run) must not start model servers
    # or build the engine: a module under tests/integration that asks for llama-server, a
    # real model or lalo itself says so with pytest.mark.integration
    needs = ("llama_server_bin", "smollm2", "LaloUp", "subprocess")
    unmarked = [p.name for p in sorted((TESTS / "integration").glob("test_*.py"))
                if any(n in (text := p.read_text()) for n in needs)
                and "mark.integration" not in text]
    assert not unmarked, unmarked
