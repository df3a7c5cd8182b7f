"""The fault suite's short cases (issue 14): a real `lalo up`, real llama-server children, faults
made from outside (kill -9, SIGSTOP, clients that leave, malformed HTTP). Each test asserts what
the issue demands; bench/faults.py runs the same cases (more runs) plus the soak and the load,
and writes docs/reliability.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import faults, faults_http

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(tmp_path: Path, llama_server_bin: Path, small_model: Path, small_model_b: Path,
          small_model_c: Path, smollm2: Path) -> faults.Stack:
    return faults.Stack(server=llama_server_bin, tiny=(small_model, small_model_b, small_model_c),
                        smollm2=smollm2, workdir=tmp_path)


def check(result: faults.CaseResult) -> None:
    assert result.ok, result.explain()


def test_kill_9_of_a_model_server_mid_stream_loses_no_request(stack: faults.Stack) -> None:
    check(faults.kill_model_mid_stream(stack, runs=2))


def test_sigstop_of_a_model_server_is_found_and_replaced(stack: faults.Stack) -> None:
    check(faults.sigstop_model(stack, runs=1))


def test_kill_9_of_lalo_leaves_no_model_server(stack: faults.Stack) -> None:
    check(faults.kill_lalo(stack, runs=1))


def test_30_early_disconnects_stop_every_slot_and_the_next_request_is_answered(
    stack: faults.Stack,
) -> None:
    # Before: two abandoned non-streamed requests on one server kept each other generating to
    # max_tokens (llama-server noticed a gone non-streamed client only after a second without
    # any result); lalo now asks for streams (proxy/assemble.py), which stop at the next token.
    # About 1 run in 6 kept one request in flight: a disconnect in the step the upstream
    # connection opened was dropped by Python 3.11's wait_for (tests/unit/test_upstream.py)
    # The target is 1 s (bench/faults.py reports it). CI's machines are shared: 5 s still tells
    # slots that stopped (0.2 s on a quiet machine, 1.4-2.1 s here beside a 2-core compile)
    # from an abandoned generation (> 30 s)
    check(faults.early_disconnects(stack, clients=30, settle=5.0))


def test_36_requests_over_three_on_demand_models_with_max_loaded_2_are_all_answered(
    stack: faults.Stack,
) -> None:
    check(faults.mixed_on_demand(stack, requests=36))


def test_malformed_http_is_refused_and_lalo_stays_healthy(stack: faults.Stack) -> None:
    check(faults_http.malformed_http(stack))


def test_bad_json_bodies_get_the_error_envelope(stack: faults.Stack) -> None:
    check(faults_http.bad_json(stack))
