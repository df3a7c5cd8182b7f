"""The weights a GPU would take, per layer, from the real models' tensor tables, against the
`model buffer size` llama-server printed loading the same files (tests/unit/data/llama-server-kv:
on the CPU build every layer is in the CPU buffers, so their sum is the whole file's tensors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launcher.models.gguf_file import read_gguf
from launcher.models.shape import ModelFacts
from launcher.placement.gpu_split import split_memory

pytestmark = pytest.mark.integration  # the real models come from the package index

DATA = Path(__file__).parents[1] / "unit" / "data" / "llama-server-kv"
MIB = 1024**2


def mapped_buffer(log_name: str) -> float:
    text = (DATA / log_name).read_text()
    (mib,) = re.findall(r"CPU_Mapped model buffer size =\s+([\d.]+) MiB", text)
    return float(mib) * MIB


@pytest.mark.parametrize(("fixture", "log_name"), [
    ("smollm2", "smollm2-135m-instruct-c8192-np1.log"),
    ("gemma3", "gemma-3-270m-c8192-np2.log"),
])
def test_layer_weights_add_up_to_llama_servers_model_buffer(
        fixture: str, log_name: str, request: pytest.FixtureRequest) -> None:
    facts = ModelFacts.from_gguf(read_gguf(request.getfixturevalue(fixture)))
    input_bytes, layers, output_bytes = facts.weight_layout()
    assert len(layers) == facts.n_layer and min(layers) > 0
    # both models tie the output to the token embedding: it is loaded once on the CPU
    assert facts.output_tied
    assert input_bytes + sum(layers) == pytest.approx(mapped_buffer(log_name), abs=0.01 * MIB)
    whole = split_memory(facts, 8192, 1, facts.n_layer + 1)
    # on a GPU the tied output is a second copy; the embedding stays in RAM for the input
    assert whole.devices[0].weights == sum(layers) + output_bytes
    assert whole.ram.weights == facts.weight_bytes - sum(layers)
