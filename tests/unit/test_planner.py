"""Planner decisions on crafted budgets, and eviction choices."""

from __future__ import annotations

import re
from dataclasses import replace

from launcher.models.shape import QUANT_BITS, ModelFacts, approximate_matmul_bytes
from launcher.placement.estimate import estimate_memory
from launcher.placement.planner import (
    Budget,
    Candidate,
    compute_budget,
    make_plan,
)

MIB = 1024**2
GIB = 1024**3


def facts(params: int = 1_200_000_000, file_type: str = "Q8_0", bits: float = 8.5) -> ModelFacts:
    return ModelFacts(
        architecture="llama", parameters=params, weight_bytes=int(params * bits / 8),
        n_layer=16, n_embd=2048, n_ff=8192, n_head=32, n_vocab=65536,
        kv_heads=(8,) * 16, key_length=64, value_length=64, n_ctx_train=32768,
        file_type=file_type,
    )


def test_auto_budget_is_available_minus_reserve() -> None:
    budget = compute_budget("auto", 1 * GIB, 7 * GIB)
    assert budget.bytes == 6 * GIB
    assert budget.source == "auto: 7.00 GiB available - 1.00 GiB reserve"
    assert compute_budget("auto", 2 * GIB, 1 * GIB).bytes == 0


def test_configured_budget_notes_when_above_available() -> None:
    budget = compute_budget(6 * GIB, 1 * GIB, 4 * GIB)
    assert budget.bytes == 6 * GIB
    assert "more than the 4.00 GiB available now" in budget.source


def test_preload_models_start_in_order_while_they_fit() -> None:
    plan = make_plan(
        [Candidate("a", 3 * GIB, True), Candidate("b", 2 * GIB, True), Candidate("c", 2 * GIB, True),
         Candidate("d", 1 * GIB, False)],
        Budget(6 * GIB, "test"),
    )
    assert [d.action for d in plan.decisions] == ["start", "start", "on-demand", "on-demand"]
    assert plan.preload_total == 5 * GIB
    assert plan.remaining == 1 * GIB
    assert plan.decision("c").reason == (
        "needs 2.00 GiB but only 1.00 GiB is left beside a, b; loads on first request, "
        "unloading idle models"
    )
    assert plan.decision("d").reason == "loads on first request; needs 1.00 GiB (estimated)"


def test_max_loaded_caps_preloads() -> None:
    plan = make_plan([Candidate(n, 100 * MIB, True) for n in "abc"], Budget(GIB, "t"), max_loaded=2)
    assert [d.action for d in plan.decisions] == ["start", "start", "on-demand"]
    assert "max_loaded=2 reached by a, b" in plan.decision("c").reason


def test_a_model_that_cannot_fit_alone_gets_numbers_and_what_would_fit() -> None:
    model_facts = facts()
    need = estimate_memory(model_facts, 32768).total
    budget = Budget(estimate_memory(model_facts, 4096).total, "test")
    plan = make_plan([Candidate("big", need, True, facts=model_facts, ctx_size=32768)], budget)
    decision = plan.decision("big")
    assert decision.action == "cannot-fit"
    assert decision.reason.startswith(f"needs {need / GIB:.2f} GiB (estimated), more than the whole budget")
    assert decision.suggestions[0].startswith("ctx_size: ")
    assert decision.suggestions[0] == "ctx_size: 4096 would fit"
    assert len(decision.suggestions) == 1  # the KV cache at 32k is the problem, not the weights


def test_a_smaller_quantization_is_suggested_when_it_would_fit() -> None:
    model_facts = facts()
    weights = int(model_facts.parameters * 4.85 / 8)
    q4 = replace(model_facts, weight_bytes=weights,
                 matmul_bytes_by_type=approximate_matmul_bytes("Q4_K_M", weights))
    budget = Budget(estimate_memory(q4, 2048).total + MIB, "test")
    need = estimate_memory(model_facts, 2048).total
    plan = make_plan([Candidate("m", need, True, facts=model_facts, ctx_size=2048)], budget)
    hints = plan.decision("m").suggestions
    match = re.fullmatch(r"a (\S+) file \(~.+\) would fit at ctx_size 2048", hints[-1])
    assert match, hints
    named = match.group(1)
    suggested = replace(model_facts, weight_bytes=int(model_facts.parameters * QUANT_BITS[named] / 8),
                        matmul_bytes_by_type=approximate_matmul_bytes(
                            named, int(model_facts.parameters * QUANT_BITS[named] / 8)))
    assert estimate_memory(suggested, 2048).total <= budget.bytes


def test_nothing_fits_says_so() -> None:
    plan = make_plan([Candidate("big", 5 * GIB, True, facts=facts(), ctx_size=2048)],
                     Budget(100 * MIB, "t"))
    assert plan.decision("big").suggestions == (
        "no smaller context or quantization fits; use a smaller model or free RAM",
    )


def test_measured_figure_is_reported() -> None:
    plan = make_plan([Candidate("a", GIB, True, measured=True)], Budget(2 * GIB, "t"))
    assert "(measured)" in plan.decision("a").reason
