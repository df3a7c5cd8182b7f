"""The KV arithmetic of the memory estimate against llama-server's own log lines.

The logs in data/llama-server-kv/ are excerpts of the real llama-server lalo builds
(`--log-verbosity 4`, `-c CTX -np N` as lalo passes them) loading the real SmolLM2-135M-Instruct
and Gemma 3 270M; each names its context and slots. Gemma 3 slides 15 of its 18 layers over a
512-token window: llama.cpp gives those a cache of pad256(min(slot ctx, 512 + n_ubatch)) cells
per slot and the 3 global layers the whole context.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launcher.models.catalog import default_catalog
from launcher.models.shape import CHECKPOINTS_PER_SLOT, ModelFacts, swa_layer_flags
from launcher.placement.estimate import estimate_memory

DATA = Path(__file__).parent / "data" / "llama-server-kv"
MIB = 1024**2
# llama_kv_cache: size =   96.00 MiB ( 32768 cells,   3 layers,  1/1 seqs), K (f16): ...
_KV = re.compile(r"llama_kv_cache: size =\s+([\d.]+) MiB "
                 r"\(\s*(\d+) cells,\s+(\d+) layers,\s+(\d+)/(\d+) seqs\)")
_NAME = re.compile(r"^(?P<model>.+)-c(?P<ctx>\d+)-np(?P<np>\d+)\.log$")


def logged_caches(text: str) -> list[tuple[float, int, int]]:
    """(bytes, cells over all streams, layers) of each KV cache llama-server made."""
    return [(float(mib) * MIB, int(cells) * int(streams), int(layers))
            for mib, cells, layers, _, streams in _KV.findall(text)]


def facts_of(model_id: str) -> ModelFacts:
    return default_catalog().get(model_id).facts()


CASES = sorted(path.name for path in DATA.glob("*.log"))


def test_the_logs_cover_both_models_several_slots_and_an_unpadded_context() -> None:
    assert {"gemma-3-270m-c32768-np1.log", "gemma-3-270m-c5000-np3.log", "gemma-3-270m-c700-np1.log",
            "smollm2-135m-instruct-c32768-np1.log"} <= set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_kv_cells_and_bytes_equal_what_llama_server_allocated(name: str) -> None:
    match = _NAME.match(name)
    assert match is not None
    facts = facts_of(match["model"])
    ctx, parallel = int(match["ctx"]), int(match["np"])
    caches = logged_caches((DATA / name).read_text())
    global_cells, swa_cells = facts.kv_cells(ctx, parallel)
    global_bytes = global_cells * facts.kv_bytes_per_token(sliding=False)
    swa_bytes = swa_cells * facts.kv_bytes_per_token(sliding=True)
    if facts.sliding_window:
        (g_bytes, g_cells, g_layers), (s_bytes, s_cells, s_layers) = caches
        assert (g_cells, g_layers) == (global_cells, 3)
        assert (s_cells, s_layers) == (swa_cells, 15)
        assert s_bytes == pytest.approx(swa_bytes, abs=0.01 * MIB)
    else:
        ((g_bytes, g_cells, g_layers),) = caches
        assert (g_cells, g_layers, swa_cells) == (global_cells, facts.n_layer, 0)
    assert g_bytes == pytest.approx(global_bytes, abs=0.01 * MIB)
    estimate = estimate_memory(facts, ctx, parallel)
    assert estimate.kv_cache == pytest.approx(sum(cache[0] for cache in caches), abs=0.02 * MIB)
    window = min(facts.sliding_window, swa_cells // parallel)
    per_cell = facts.kv_bytes_per_token(sliding=True)
    assert estimate.checkpoints == CHECKPOINTS_PER_SLOT * parallel * window * per_cell


def test_gemma3_at_32k_no_longer_counts_every_layer_at_the_whole_context() -> None:
    # The figures: lalo said 576 MiB of KV; llama-server allocates 96 + 15 MiB.
    estimate = estimate_memory(facts_of("gemma-3-270m"), 32768, 1)
    assert estimate.kv_cache == 111 * MIB
    # what llama-server logged for each checkpoint of a filled 2048 context: 7.506 MiB
    assert estimate.checkpoints == CHECKPOINTS_PER_SLOT * 7.5 * MIB


def test_swa_patterns_follow_llama_cpp() -> None:
    # set_swa_pattern(n): layer il slides when il % n < n - 1 (Gemma 3: n = 6, Gemma 2: n = 2)
    assert swa_layer_flags(12, 6) == (True,) * 5 + (False,) + (True,) * 5 + (False,)
    assert swa_layer_flags(4, 2) == (True, False, True, False)
    assert swa_layer_flags(3, [1, 0, 1, 1]) == (True, False, True)  # a per-layer array in the GGUF
    assert facts_of("gemma-3-270m").swa_layers == swa_layer_flags(18, 6)
    assert facts_of("smollm2-135m-instruct").kv_cells(4096, 2) == (4096, 0)
