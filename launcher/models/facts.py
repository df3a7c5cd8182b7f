"""A catalog model's facts for the memory estimate: from its GGUF once the file is on disk, from
the catalog entry only before a pull. One source per moment, so `doctor`, `models list`, `plan`
and `up` give a model one figure.

The catalog's `weights` block is the file's own tensor table in brief (`lalo inspect FILE --json`
prints it as `catalog_weights`); tests/integration/test_catalog_facts.py holds each entry whose
file can be had to its file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import GGUFError
from launcher.models.gguf_file import read_gguf
from launcher.models.shape import ModelFacts, approximate_matmul_bytes, conv_state_bytes

if TYPE_CHECKING:
    from launcher.models.catalog_entry import CatalogEntry


def catalog_facts(entry: CatalogEntry) -> ModelFacts:
    """Facts before the file exists: the architecture block, and the `weights` block where the
    file has been read (else the file's size as weights, the usual share of its main type)."""
    arch = entry.architecture
    recurrent = conv_state_bytes(arch.conv_l_cache, arch.n_embd) if arch.conv_l_cache else 0
    weights = entry.weights
    if weights is None:
        weight_bytes = entry.size
        matmul = approximate_matmul_bytes(entry.file_type, entry.size)
        layout: dict[str, Any] = {}
    else:
        weight_bytes = weights.bytes
        matmul = dict(weights.matmul)
        # no per-layer table in the catalog: the layers share the rest evenly (GPU offload only)
        per_layer = max(0, weights.bytes - weights.input
                        - (0 if weights.tied else weights.output)) // arch.n_layer
        layout = {"input_bytes": weights.input, "output_bytes": weights.output,
                  "output_tied": weights.tied, "layer_bytes": (per_layer,) * arch.n_layer}
    return ModelFacts(
        architecture=arch.name,
        parameters=arch.parameters,
        weight_bytes=weight_bytes,
        n_layer=arch.n_layer,
        n_embd=arch.n_embd,
        n_ff=arch.n_ff,
        n_head=arch.n_head,
        n_vocab=arch.n_vocab,
        kv_heads=arch.kv_heads(),
        key_length=arch.head_dim,
        value_length=arch.head_dim,
        n_ctx_train=arch.n_ctx_train,
        n_merges=arch.n_merges,
        recurrent_state_per_layer=recurrent,
        file_type=entry.file_type,
        matmul_bytes_by_type=matmul,
        sliding_window=arch.sliding_window or 0,
        swa_layers=arch.swa_layers(),
        **layout,
    )


def entry_facts(entry: CatalogEntry, path: Path | None) -> ModelFacts:
    """The GGUF's facts when `path` (the cached file) is given, else the catalog's.

    A cached file that is not a readable GGUF gets the catalog's facts: `doctor` and `models
    list` still list the model (`lalo up` reports the broken file as the model's error)."""
    if path is not None:
        try:
            return ModelFacts.from_gguf(read_gguf(path))
        except GGUFError:
            pass
    return catalog_facts(entry)


def catalog_weights(facts: ModelFacts) -> dict[str, Any]:
    """The `weights` block of a catalog entry for a file's facts (what `lalo inspect` prints)."""
    return {"bytes": facts.weight_bytes, "matmul": dict(facts.matmul_bytes_by_type),
            "input": facts.input_bytes, "output": facts.output_bytes, "tied": facts.output_tied}
