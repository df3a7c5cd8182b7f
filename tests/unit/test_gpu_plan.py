"""The VRAM/RAM split of the estimate and the GPU planner.

The KV side is checked against llama-server's own `KV buffer size` lines (data/llama-server-kv/,
the real models on the CPU build: the per-layer KV that moves to a GPU is the same arithmetic);
the layer placement against llama-model.cpp's rule. Not checked here: CUDA compute buffers and
the CUDA context, which only a GPU run prints (no GPU on this machine).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launcher.engines.base import ServerSettings
from launcher.engines.llama_server import LlamaServerEngine
from launcher.models.catalog import default_catalog
from launcher.placement.estimate import estimate_memory
from launcher.placement.gpu_plan import VRAM_RESERVE, Gpu, GpuModel, plan_gpus
from launcher.placement.gpu_split import CUDA_CONTEXT, layer_devices, split_memory

DATA = Path(__file__).parent / "data" / "llama-server-kv"
MIB = 1024**2
GIB = 1024**3
_KV_BUFFER = re.compile(r"CPU KV buffer size =\s+([\d.]+) MiB")
_NAME = re.compile(r"^(?P<model>.+)-c(?P<ctx>\d+)-np(?P<np>\d+)\.log$")
CATALOG_IDS = {"smollm2-135m-instruct": "smollm2-135m-instruct", "gemma-3-270m": "gemma-3-270m"}


@pytest.mark.parametrize("name", sorted(path.name for path in DATA.glob("*.log")))
def test_all_layers_offloaded_move_exactly_the_kv_llama_server_allocated(name: str) -> None:
    match = _NAME.match(name)
    assert match is not None
    facts = default_catalog().get(CATALOG_IDS[match["model"]]).facts()
    ctx, parallel = int(match["ctx"]), int(match["np"])
    logged = sum(float(mib) for mib in _KV_BUFFER.findall((DATA / name).read_text())) * MIB
    assert logged > 0
    assert sum(facts.kv_layer_bytes(ctx, parallel)) == pytest.approx(logged, abs=0.01 * MIB)
    whole = split_memory(facts, ctx, parallel, facts.n_layer + 1)
    assert whole.devices[0].kv_cache == pytest.approx(logged, abs=0.01 * MIB)
    assert whole.ram.kv_cache == 0


@pytest.mark.parametrize("model_id", ["smollm2-135m-instruct", "gemma-3-270m", "lfm2-1.2b-tool"])
def test_no_offload_is_the_cpu_estimate_and_more_layers_move_more(model_id: str) -> None:
    facts = default_catalog().get(model_id).facts()
    cpu = estimate_memory(facts, 4096, 2)
    assert split_memory(facts, 4096, 2, 0).ram == cpu
    previous_vram, previous_ram = 0, cpu.total
    for ngl in range(1, facts.n_layer + 2):
        split = split_memory(facts, 4096, 2, ngl)
        assert split.vram > previous_vram and split.ram.total <= previous_ram
        previous_vram, previous_ram = split.vram, split.ram.total
    # the input layer never moves: at full offload the embedding stays in RAM
    input_bytes, _, _ = facts.weight_layout()
    assert split_memory(facts, 4096, 2, 999).ram.weights >= input_bytes


def test_layers_go_last_first_and_split_as_llama_cpp_assigns_them() -> None:
    # llama-model.cpp: i_gpu_start = n_layer + 1 - ngl; device = upper_bound(cumulative split)
    assert layer_devices(4, 0, (1.0,)) == (-1, -1, -1, -1, -1)
    assert layer_devices(4, 1, (1.0,)) == (-1, -1, -1, -1, 0)  # ngl 1 = the output layer only
    assert layer_devices(4, 3, (1.0,)) == (-1, -1, 0, 0, 0)
    assert layer_devices(4, 99, (1.0,)) == (0, 0, 0, 0, 0)
    assert layer_devices(5, 6, (1.0, 1.0)) == (0, 0, 0, 1, 1, 1)
    assert layer_devices(7, 8, (3.0, 1.0)) == (0, 0, 0, 0, 0, 0, 1, 1)
    assert layer_devices(3, 4, (0.0, 1.0)) == (1, 1, 1, 1)


def test_each_gpu_pays_its_context_and_the_output_gpu_the_vocabulary() -> None:
    facts = default_catalog().get("qwen2.5-0.5b-instruct").facts()
    split = split_memory(facts, 4096, 1, facts.n_layer + 1, (1.0, 1.0))
    first, second = split.devices
    assert first.layers + second.layers == facts.n_layer
    assert second.output and not first.output
    assert first.context == second.context == CUDA_CONTEXT
    assert second.compute - first.compute == facts.n_vocab * 16


def test_planner_puts_small_models_whole_on_one_gpu_and_sizes_left() -> None:
    catalog = default_catalog()
    models = [GpuModel(e.id, e.facts(), e.default_ctx) for e in catalog]
    plan = plan_gpus(models, [Gpu("RTX 4060 Ti", 16 * GIB)], 8 * GIB)
    for placement in plan.placements:
        assert placement.fits and placement.gpus == (0,)
        assert placement.gpu_layers == placement.split.devices[0].layers + 1
        assert placement.server_args() == ["--n-gpu-layers", str(placement.gpu_layers)]
    used = sum(p.split.vram for p in plan.placements)
    assert plan.vram_left() == [16 * GIB - VRAM_RESERVE - used]


def test_planner_offloads_what_fits_and_keeps_the_rest_in_ram() -> None:
    facts = default_catalog().get("phi-2").facts()
    model = GpuModel("phi-2", facts, 2048)
    whole_vram = split_memory(facts, 2048, 1, facts.n_layer + 1).vram
    plan = plan_gpus([model], [Gpu("small", VRAM_RESERVE + whole_vram // 2)], 8 * GIB)
    (placement,) = plan.placements
    assert 0 < placement.gpu_layers < facts.n_layer + 1
    assert "the rest in RAM" in placement.reason
    assert plan.vram_left()[0] >= 0
    # one layer more would not have fitted
    assert split_memory(facts, 2048, 1, placement.gpu_layers + 1).vram > whole_vram // 2


def test_planner_splits_a_model_too_big_for_either_gpu_across_both() -> None:
    facts = default_catalog().get("phi-2").facts()
    whole_vram = split_memory(facts, 2048, 1, facts.n_layer + 1).vram
    size = VRAM_RESERVE + int(whole_vram * 0.75)
    plan = plan_gpus([GpuModel("phi-2", facts, 2048)], [Gpu("a", size), Gpu("b", size)], 8 * GIB)
    (placement,) = plan.placements
    assert placement.gpus == (0, 1) and placement.gpu_layers == facts.n_layer + 1
    assert placement.tensor_split[0] == placement.tensor_split[1] > 0
    assert "--tensor-split" in placement.server_args()


def test_planner_without_gpus_or_room_is_the_cpu_and_says_when_ram_is_short() -> None:
    facts = default_catalog().get("phi-2").facts()
    plan = plan_gpus([GpuModel("phi-2", facts, 2048)], [], 8 * GIB)
    assert plan.placements[0].reason == "on the CPU: no GPU"
    short = plan_gpus([GpuModel("phi-2", facts, 2048)], [], 1 * GIB)
    assert not short.placements[0].fits and "does not fit" in short.placements[0].reason


def test_the_chosen_layers_reach_llama_servers_argv() -> None:
    settings = ServerSettings(model_path=Path("/m.gguf"), host="127.0.0.1", port=1, api_key="k",
                              ctx_size=2048, parallel=1, threads=None, gpu_layers=33,
                              tensor_split=(0.0, 3.0, 1.0))
    argv = LlamaServerEngine(Path("/bin/llama-server")).launch_spec(settings).argv
    assert argv[argv.index("--n-gpu-layers") + 1] == "33"
    assert argv[argv.index("--tensor-split") + 1] == "0,3,1"
    plain = ServerSettings(model_path=Path("/m.gguf"), host="127.0.0.1", port=1, api_key="k",
                           ctx_size=2048, parallel=1, threads=None)
    assert "--n-gpu-layers" not in LlamaServerEngine(Path("/bin/x")).launch_spec(plain).argv
