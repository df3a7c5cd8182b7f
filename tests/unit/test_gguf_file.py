"""GGUF header reading: facts match what the generator wrote; bad files give one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.errors import GGUFError
from launcher.models.gguf_file import read_gguf
from launcher.models.synthetic import ModelShape, write_synthetic_model

SHAPES = [
    ModelShape(n_embd=64, n_layer=2, n_head=4, n_head_kv=4, n_ff=128, n_vocab=1024),
    ModelShape(n_embd=128, n_layer=3, n_head=8, n_head_kv=2, n_ff=352, n_vocab=3000,
               n_ctx_train=8192, tie_embeddings=False),
    ModelShape(architecture="lfm2", n_embd=96, n_layer=5, n_head=6, n_head_kv=2, n_ff=256,
               n_vocab=2048, attention_layers=(1, 3)),
]


@pytest.mark.parametrize("shape", SHAPES, ids=["llama-mha", "llama-gqa-untied", "lfm2-hybrid"])
@pytest.mark.parametrize("tensor_type", ["F16", "Q8_0"])
def test_facts_match_the_generator(tmp_path: Path, shape: ModelShape, tensor_type: str) -> None:
    path = write_synthetic_model(tmp_path / "m.gguf", shape, tensor_type=tensor_type)
    info = read_gguf(path)
    summary = info.summary()
    assert summary["architecture"] == shape.architecture
    assert summary["parameters"] == shape.parameter_count()
    assert summary["layers"] == shape.n_layer
    assert summary["embedding_length"] == shape.n_embd
    assert summary["feed_forward_length"] == shape.n_ff
    assert summary["heads"] == shape.n_head
    assert summary["kv_heads"] == shape.n_head_kv
    assert summary["context_length"] == shape.n_ctx_train
    assert summary["vocab_size"] == shape.n_vocab
    assert summary["file_type"] == tensor_type
    assert summary["chat_template"] is True
    assert summary["synthetic"] is True
    assert "random weights" in summary["name"]
    expected_attention = len(shape.attention_layers) if shape.architecture == "lfm2" else shape.n_layer
    assert summary["attention_layers"] == expected_attention
    # tensor data is the file minus the header, up to alignment padding
    assert 0 <= info.file_size - info.data_offset - info.tensor_bytes < 32 * len(info.tensors)


def test_kv_heads_per_layer_for_hybrid(tmp_path: Path) -> None:
    info = read_gguf(write_synthetic_model(tmp_path / "m.gguf", SHAPES[2]))
    assert info.head_count_kv_per_layer() == [0, 2, 0, 2, 0]


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a model at all\n")
    with pytest.raises(GGUFError, match=r"notes.txt: not a GGUF file \(starts with b'hell'\)"):
        read_gguf(path)


def test_tiny_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match=r"not a GGUF file \(0 bytes\)"):
        read_gguf(tmp_path / "empty.gguf")
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(tmp_path / "absent.gguf")
    with pytest.raises(GGUFError, match="is a directory"):
        read_gguf(tmp_path)


@pytest.mark.parametrize("keep", [30, 200, 5000, 5003, 20001, 100_003, -1000])
def test_truncated_files(tmp_path: Path, keep: int) -> None:
    whole = write_synthetic_model(tmp_path / "m.gguf", SHAPES[0]).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:keep])
    with pytest.raises(GGUFError, match="truncated GGUF"):
        read_gguf(cut)


def test_corrupt_counts_and_version(tmp_path: Path) -> None:
    whole = bytearray(write_synthetic_model(tmp_path / "m.gguf", SHAPES[0]).read_bytes())
    bad_version = tmp_path / "v.gguf"
    bad_version.write_bytes(whole[:4] + (99).to_bytes(4, "little") + whole[8:])
    with pytest.raises(GGUFError, match="unsupported GGUF version 99"):
        read_gguf(bad_version)
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(whole[:8] + (2**40).to_bytes(8, "little") + whole[16:])
    with pytest.raises(GGUFError, match="corrupt GGUF header"):
        read_gguf(huge)


def test_reading_is_instant_on_a_large_file(tmp_path: Path) -> None:
    # A header followed by 2 GiB of sparse space: only the header may be read.
    path = write_synthetic_model(tmp_path / "m.gguf", SHAPES[0])
    with path.open("r+b") as handle:
        handle.truncate(2 * 1024**3)
    info = read_gguf(path)
    assert info.file_size == 2 * 1024**3
    assert info.parameter_count == SHAPES[0].parameter_count()


def test_type_tables_match_gguf_py() -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

    from launcher.models.ggml_types import FILE_TYPES, TENSOR_TYPES

    for kind in GGMLQuantizationType:
        assert TENSOR_TYPES[int(kind)] == (kind.name, *GGML_QUANT_SIZES[kind])
    for file_type in LlamaFileType:
        assert FILE_TYPES[int(file_type)] == file_type.name.removeprefix("MOSTLY_").removeprefix("ALL_")
