"""A power cut mid-write (issue 27, item 6): one kill -9 at a random point of each writer, then
what the next start finds (cases in tests/support/power_cut.py; bench/faults.py runs twenty of
each and writes the figures to docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import power_cut
from tests.support.faults import CaseResult, Stack

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(tmp_path: Path, llama_server_bin: Path, small_model: Path, small_model_b: Path,
          small_model_c: Path, smollm2: Path) -> Stack:
    return Stack(server=llama_server_bin, tiny=(small_model, small_model_b, small_model_c),
                 smollm2=smollm2, workdir=tmp_path)


def check(result: CaseResult) -> None:
    assert result.ok, result.explain()


def test_a_pull_killed_mid_download_resumes_and_verifies(stack: Stack) -> None:
    check(power_cut.pull_kills(stack, runs=1))


def test_lalo_killed_while_the_activity_store_is_written_opens_it_again(stack: Stack) -> None:
    check(power_cut.activity_kills(stack, runs=1))


def test_lalo_killed_during_a_prompt_cache_save_restores_nothing_partial(stack: Stack) -> None:
    check(power_cut.prompt_cache_kills(stack, runs=1))


def test_a_build_killed_mid_write_leaves_nothing_partial_in_place(stack: Stack) -> None:
    check(power_cut.build_kills(stack, runs=1))
