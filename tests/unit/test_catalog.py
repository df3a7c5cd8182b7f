"""The packaged catalog: valid, in sync with models/catalog.yaml, its facts agree with the
synthetic shapes, and bad entries are errors that name the YAML path and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config import LoadedConfig, parse_config
from launcher.errors import ConfigError
from launcher.models.catalog import (
    CATALOG_ENV,
    catalog_resolver,
    default_catalog,
    load_catalog,
    packaged_catalog_path,
    parse_catalog,
)
from launcher.models.hub import HubClient
from launcher.models.hub_file import HubSettings
from launcher.models.licenses import check_redistribution
from launcher.models.synthetic import SHAPES
from launcher.placement.estimate import estimate_memory
from launcher.placement.resolve import resolve_models

REPO_ROOT = Path(__file__).resolve().parents[2]
PLAN_MODELS = {
    "lfm2-350m-extract",
    "lfm2-1.2b-tool",
    "qwen2.5-0.5b-instruct",
    "tinyllama-1.1b-chat",
    "phi-2",
}


def test_top_level_copy_is_identical_to_the_packaged_catalog() -> None:
    packaged = packaged_catalog_path().read_bytes()
    assert (REPO_ROOT / "models" / "catalog.yaml").read_bytes() == packaged, (
        "models/catalog.yaml and launcher/data/catalog.yaml differ: copy one over the other"
    )


def test_catalog_holds_the_plans_models_with_their_real_licences() -> None:
    catalog = default_catalog()
    assert PLAN_MODELS <= set(catalog.entries)
    licences = {entry.id: entry.license.id for entry in catalog}
    # The plan called the Liquid models Apache-2.0: their cards say LFM Open License v1.0.
    assert licences["lfm2-350m-extract"] == licences["lfm2-1.2b-tool"] == "lfm1.0"
    assert licences["qwen2.5-0.5b-instruct"] == licences["tinyllama-1.1b-chat"] == "Apache-2.0"
    assert licences["phi-2"] == "MIT"
    for entry in catalog:
        assert entry.license.source.startswith("https://huggingface.co/")
        if entry.license.id == "lfm1.0":
            assert entry.license.name == "LFM Open License v1.0" and entry.license.url


@pytest.mark.parametrize("model_id", sorted(PLAN_MODELS))
def test_entries_are_q4_k_m_gguf_files(model_id: str) -> None:
    entry = default_catalog().get(model_id)
    assert entry.file_type == "Q4_K_M" and "q4_k_m" in entry.file.lower()
    assert entry.default_ctx <= entry.context
    assert entry.hub_file().sha256 == entry.sha256 and entry.hub_file().revision == entry.revision


@pytest.mark.parametrize("model_id", sorted(PLAN_MODELS))
def test_facts_agree_with_the_synthetic_shape_used_for_benchmarks(model_id: str) -> None:
    entry = default_catalog().get(model_id)
    arch = entry.architecture
    assert entry.bench_shape is not None
    shape = SHAPES[entry.bench_shape]
    assert (shape.n_embd, shape.n_layer, shape.n_head, shape.n_head_kv, shape.n_vocab) == (
        arch.n_embd,
        arch.n_layer,
        arch.n_head,
        arch.n_head_kv,
        arch.n_vocab,
    )
    assert shape.head_dim == arch.head_dim
    if arch.attention_layers is not None:
        assert shape.architecture == "lfm2" and shape.attention_layers == arch.attention_layers
    else:
        assert shape.n_ff == arch.n_ff or entry.bench_shape == "phi-2-equiv"
    # Same bytes per token to within 2 %: the benchmark reads what the real model reads.
    assert shape.parameter_count() == pytest.approx(arch.parameters, rel=0.02)


def test_facts_estimate_memory_before_any_download() -> None:
    for entry in default_catalog():
        facts = entry.facts()
        estimate = estimate_memory(facts, entry.default_ctx)
        # the tensor data the file was read to hold, else the file's size standing in for it
        weights = entry.weights.bytes if entry.weights is not None else entry.size
        assert estimate.weights == weights <= entry.size and estimate.total > entry.size
        attention = facts.attention_layers
        assert (
            facts.kv_bytes_per_token()
            == attention * entry.architecture.n_head_kv * entry.architecture.head_dim * 2 * 2
        )
    lfm = default_catalog().get("lfm2-1.2b-tool").facts()
    assert lfm.attention_layers == 6 and lfm.recurrent_state_per_layer == 2 * 2048 * 4


def test_liquid_models_are_not_redistributable_by_default() -> None:
    decisions = {e.id: check_redistribution(e.id, e.license.id).allowed for e in default_catalog()}
    assert decisions == {
        "lfm2-350m-extract": False,
        "lfm2-1.2b-tool": False,
        "qwen2.5-0.5b-instruct": True,
        "tinyllama-1.1b-chat": True,
        "phi-2": True,
        "smollm2-135m-instruct": True,
        "gemma-3-270m": False,  # Gemma Terms of Use
    }


GOOD = """\
schema: 1
models:
  m:
    name: M
    repo: org/m-GGUF
    file: m-Q4_K_M.gguf
    revision: main
    file_type: Q4_K_M
    size: 1000000
    sha256: null
    license: {id: MIT, source: https://example.invalid}
    base_model: org/m
    purpose: test
    context: 2048
    default_ctx: 1024
    architecture:
      name: llama
      parameters: 1000000
      n_layer: 2
      n_embd: 64
      n_ff: 128
      n_head: 4
      n_head_kv: 4
      head_dim: 16
      n_vocab: 1024
      n_ctx_train: 2048
"""


def test_a_minimal_catalog_parses() -> None:
    catalog = parse_catalog(GOOD, label="c.yaml")
    assert list(catalog.entries) == ["m"] and not catalog.get("m").pinned


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "sha256: null",
            "sha256: ABC",
            "c.yaml:10: models.m.sha256: must be 64 lowercase hex digits",
        ),
        (
            "purpose: test",
            "purpose: test\n    colour: red",
            "c.yaml:14: models.m.colour: Extra inputs",
        ),
        (
            "license: {id: MIT, source: https://example.invalid}",
            "license: {id: lfm1.0, source: https://example.invalid}",
            "c.yaml:11: models.m.license: custom licence 'lfm1.0' needs `name` and `url`",
        ),
        ("default_ctx: 1024", "default_ctx: 4096", "c.yaml:3: models.m: default_ctx 4096 is above"),
        (
            "n_head_kv: 4",
            "n_head_kv: 3",
            "c.yaml:16: models.m.architecture: n_head (4) must be a multiple",
        ),
        ("file_type: Q4_K_M", "file_type: Q4_K_X", "c.yaml:8: models.m.file_type: must be one of"),
        (
            "repo: org/m-GGUF",
            "repo: just-a-name",
            "c.yaml:5: models.m.repo: must be a hub repository id",
        ),
        ("size: 1000000", "size: -1", "c.yaml:9: models.m.size: Input should be greater than 0"),
    ],
)
def test_bad_entries_name_the_yaml_path_and_line(old: str, new: str, expected: str) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError) as error:
        parse_catalog(GOOD.replace(old, new), label="c.yaml")
    assert str(error.value).startswith(expected), str(error.value)


def test_bad_top_level_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"c.yaml:1: schema: must be 1"):
        parse_catalog(GOOD.replace("schema: 1", "schema: 2"), label="c.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml:3: invalid YAML"):
        parse_catalog("schema: 1\nmodels: [\n", label="c.yaml")


def test_lalo_catalog_points_at_another_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(GOOD, encoding="utf-8")
    monkeypatch.setenv(CATALOG_ENV, str(path))
    assert list(default_catalog().entries) == ["m"]
    assert list(load_catalog().entries) == ["m"]


def test_resolver_gives_facts_without_a_file_and_rejects_unknown_ids(tmp_path: Path) -> None:
    client = HubClient(HubSettings(endpoint="http://127.0.0.1:9", cache_dir=tmp_path / "hub"))
    resolver = catalog_resolver(default_catalog(), client)
    loaded = LoadedConfig(
        parse_config(
            "models:\n  tool: {catalog: lfm2-1.2b-tool}\n",
            label="lalo.yaml",
            total_ram=64 * 1024**3,
        ),
        None,
    )
    model = resolve_models(loaded, catalog=resolver)[0]
    assert model.path is None and model.facts is not None and model.estimate is not None
    assert model.facts.architecture == "lfm2"
    assert model.estimate.total == estimate_memory(model.facts, 2048).total

    bad = LoadedConfig(
        parse_config("models:\n  x: {catalog: gpt-5}\n", label="lalo.yaml", total_ram=64 * 1024**3),
        None,
    )
    with pytest.raises(ConfigError, match=r"models.x.catalog: unknown catalog model 'gpt-5'"):
        resolve_models(bad, catalog=resolver)
