"""pytest collects tests/unit and tests/integration as rootdir-relative modules: two test files
with one basename make collection fail ("import file mismatch") and CI runs nothing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_modules_have_unique_basenames() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert not [name for name, count in names.items() if count > 1]
