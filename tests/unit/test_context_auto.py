"""`ctx_size: auto` (launcher/placement/context.py): the largest context that fits, decided
from the budget and the other models."""

from __future__ import annotations

from dataclasses import replace

import pytest

from launcher.config import ModelConfig, parse_config
from launcher.errors import ConfigError
from launcher.models.shape import ModelFacts
from launcher.placement.context import AutoModel, choose_contexts, usable_ctx
from launcher.placement.estimate import MemorySettings, estimate_for

MIB = 1024**2
GIB = 1024**3


def facts(trained: int = 32768) -> ModelFacts:
    params = 500_000_000
    return ModelFacts(
        architecture="llama", parameters=params, weight_bytes=params,  # ~8.5 bits a weight
        n_layer=16, n_embd=1024, n_ff=4096, n_head=16, n_vocab=32000,
        kv_heads=(8,) * 16, key_length=64, value_length=64, n_ctx_train=trained, file_type="Q8_0",
    )


def model(name: str, yaml_extra: str = "ctx_size: auto", trained: int = 32768) -> AutoModel:
    config = parse_config(f"models:\n  {name}:\n    file: {name}.gguf\n    {yaml_extra}\n",
                          label="lalo.yaml").models[name]
    shape = facts(trained)
    return AutoModel(name, config, shape, need(shape, config, config.ctx_size))


def need(shape: ModelFacts, config: ModelConfig, ctx: int) -> int:
    return estimate_for(shape, replace(MemorySettings.of(config), ctx_size=ctx)).total


def test_yaml_auto_and_its_cap() -> None:
    one = model("a", "ctx_size: auto\n    ctx_max: 4096").config
    assert (one.ctx_auto, one.ctx_max) == (True, 4096)
    with pytest.raises(ConfigError, match="ctx_max: caps ctx_size: auto"):
        model("b", "ctx_max: 4096")
    with pytest.raises(ConfigError, match="must be 'auto' or a number"):
        model("c", "ctx_size: lots")


def test_a_model_alone_with_room_gets_its_trained_length() -> None:
    chosen = choose_contexts([model("a", trained=8192)], 8 * GIB)
    assert chosen["a"].ctx_size == 8192
    assert "the trained length 8192" in chosen["a"].reason


def test_the_cap_and_the_slots() -> None:
    assert choose_contexts([model("a", "ctx_size: auto\n    ctx_max: 5000")], 8 * GIB)["a"].ctx_size == 4864
    four = model("a", "ctx_size: auto\n    parallel: 4", trained=8192)
    assert usable_ctx(facts(8192), four.config) == (32768, "the trained length 8192 x 4 slots")


def test_the_largest_context_that_fits_and_not_one_step_more() -> None:
    one = model("a")
    assert one.facts is not None
    budget = need(one.facts, one.config, 10_000)
    ctx = choose_contexts([one], budget)["a"].ctx_size
    assert ctx % 256 == 0 and ctx < 32768
    assert need(one.facts, one.config, ctx) <= budget < need(one.facts, one.config, ctx + 256)
    assert "the most that fits" in choose_contexts([one], budget)["a"].reason


def test_preload_auto_models_share_what_fixed_models_leave() -> None:
    fixed = model("fixed", "ctx_size: 4096")
    a, b = model("a"), model("b")
    assert a.facts is not None
    budget = fixed.required + 2 * need(a.facts, a.config, 6144) + MIB
    chosen = choose_contexts([fixed, a, b], budget)
    assert "fixed" not in chosen
    assert chosen["a"].ctx_size == chosen["b"].ctx_size == 6144
    total = fixed.required + sum(need(a.facts, a.config, chosen[n].ctx_size) for n in ("a", "b"))
    assert total <= budget


def test_what_one_does_not_need_passes_to_the_next() -> None:
    small = model("small", trained=2048)
    big = model("big")
    assert big.facts is not None
    budget = 3 * need(big.facts, big.config, 8192)
    chosen = choose_contexts([small, big], budget)
    assert chosen["small"].ctx_size == 2048
    assert chosen["big"].ctx_size > 8192  # more than half the budget: small left it room


def test_on_demand_fits_beside_the_preload_models_or_else_the_whole_budget() -> None:
    big_fixed = model("fixed", "ctx_size: 32768")
    later = model("later", "ctx_size: auto\n    preload: false")
    assert later.facts is not None
    roomy = big_fixed.required + need(later.facts, later.config, 16384)
    assert choose_contexts([big_fixed, later], roomy)["later"].ctx_size == 16384
    tight = big_fixed.required + need(later.facts, later.config, 512)
    chosen = choose_contexts([big_fixed, later], tight)["later"]
    assert chosen.ctx_size > 2048 and "unloading idle models" in chosen.reason


def test_nothing_fits_says_so_and_a_reload_keeps_what_was_chosen() -> None:
    one = model("a")
    assert "not even this fits" in choose_contexts([one], 10 * MIB)["a"].reason
    kept = choose_contexts([one, model("b")], 10 * MIB, keep={"a": 8192})
    assert kept["a"].ctx_size == 8192 and "kept" in kept["a"].reason
