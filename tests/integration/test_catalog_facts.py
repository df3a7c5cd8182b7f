"""One estimate per model: each catalog entry's facts against its real file, where the file can
be had here (SmolLM2 and Gemma 3 from their wheels; a hub model only if already cached), and
`lalo doctor` against `lalo plan` for a pulled model."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config import LoadedConfig, parse_config
from launcher.doctor.report import collect_report
from launcher.models.catalog import cached_entry_path, catalog_resolver, default_catalog
from launcher.models.catalog_entry import CatalogEntry
from launcher.models.gguf_file import read_gguf
from launcher.models.shape import ModelFacts
from launcher.placement.estimate import estimate_memory, repack_types_for
from launcher.placement.resolve import resolve_model
from tests.support.real_models import REAL_MODELS, real_model

pytestmark = pytest.mark.integration

# what different CPUs repack: none, x86 AVX2, x86 AVX-512, ARM with dot products
REPACKS = [frozenset(), repack_types_for("x86_64", {"avx2"}),
           repack_types_for("x86_64", {"avx2", "avx512f"}), repack_types_for("aarch64", {"asimddp"})]


def file_of(entry: CatalogEntry) -> Path:
    if entry.id in REAL_MODELS:
        return real_model(entry.id)
    cached = cached_entry_path(entry)
    if cached is None:
        pytest.skip(f"{entry.id}: its file cannot be had here (hub only, not cached)")
    return cached


@pytest.mark.parametrize("entry", list(default_catalog()), ids=lambda entry: entry.id)
def test_catalog_facts_agree_with_the_file_within_2_percent(entry: CatalogEntry) -> None:
    catalog, real = entry.facts(), ModelFacts.from_gguf(read_gguf(file_of(entry)))
    # the shape, exactly: it decides the KV cache and the sliding window
    for name in ("architecture", "n_layer", "n_embd", "n_ff", "n_head", "n_vocab", "kv_heads",
                 "key_length", "value_length", "n_ctx_train", "sliding_window", "swa_layers",
                 "recurrent_state_per_layer", "output_tied", "n_merges"):
        assert getattr(catalog, name) == getattr(real, name), (entry.id, name)
    assert catalog.parameters == pytest.approx(real.parameters, rel=0.02)
    assert catalog.weight_bytes == pytest.approx(real.weight_bytes, rel=0.02)
    assert set(catalog.matmul_bytes_by_type) == set(real.matmul_bytes_by_type), entry.id
    for kind, size in real.matmul_bytes_by_type.items():
        assert catalog.matmul_bytes_by_type[kind] == pytest.approx(size, rel=0.02), (entry.id, kind)
    # the figure itself, on every kind of CPU, at each KV type and a few contexts
    for repack in REPACKS:
        for kv_type in ("f16", "q8_0", "q4_0"):
            for ctx in (entry.default_ctx, 512, min(entry.context, 32768)):
                ours = estimate_memory(catalog, ctx, 1, kv_type, repack).total
                theirs = estimate_memory(real, ctx, 1, kv_type, repack).total
                assert ours == pytest.approx(theirs, rel=0.02), (entry.id, sorted(repack), kv_type, ctx)


@pytest.mark.parametrize("model_id", REAL_MODELS)
def test_doctor_and_plan_give_a_pulled_model_one_figure(model_id: str) -> None:
    real_model(model_id)
    entry = default_catalog().get(model_id)
    loaded = parse_config(f"models:\n  m: {{catalog: {model_id}, ctx_size: {entry.default_ctx}}}\n",
                          label="x")
    planned = resolve_model(LoadedConfig(loaded, None), "m", catalog=catalog_resolver())
    assert planned.info is not None  # from the file, not the catalog
    fit = next(m for m in collect_report().models if m.id == model_id)
    assert fit.cached and fit.ctx_size == entry.default_ctx
    assert planned.estimate is not None and fit.estimate == planned.estimate.total
