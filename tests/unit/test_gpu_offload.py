"""Each model's GPU settings at `lalo up` / `lalo plan` and the RAM the budget then counts.

No GPU on this machine: the GPUs are a fake NVML inventory (`GpuReport` as `gpu.gpu_facts` would
return it on a GPU box), the one double here. The models are the catalog's real shapes
(SmolLM2-135M, Gemma 3 270M) and a real GGUF file for the argv through `ServerFactory`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config import LoadedConfig, ModelConfig, parse_config
from launcher.engines.base import ServerSettings
from launcher.engines.llama_server import LlamaServerEngine
from launcher.errors import ConfigError
from launcher.machine.gpu import GpuFacts, GpuReport
from launcher.models.catalog import default_catalog
from launcher.placement.cpu_share import CpuShare
from launcher.placement.estimate import estimate_memory
from launcher.placement.gpu_offload import Offload, machine_offload, plan_offload, visible_gpus
from launcher.placement.gpu_plan import VRAM_RESERVE, Gpu
from launcher.placement.gpu_split import split_memory
from launcher.placement.measurements import Measurements, measurement_key
from launcher.placement.planner import Budget, make_plan
from launcher.placement.resolve import ResolvedModel, resolve_models
from launcher.serve.factory import ServerFactory
from launcher.supervisor.events import SupervisorEvents
from launcher.supervisor.instance import ChildRecords

MIB = 1024**2
GIB = 1024**3
SMOL = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"


def resolved(name: str, catalog_id: str, **settings: object) -> ResolvedModel:
    config = ModelConfig.model_validate({"catalog": catalog_id, **settings})
    facts = default_catalog().get(catalog_id).facts()
    return ResolvedModel(name=name, config=config, path=Path(f"/models/{name}.gguf"), info=None,
                         facts=facts, estimate=estimate_memory(facts, config.ctx_size,
                                                               config.parallel))


def argv(offload: Offload, name: str) -> list[str]:
    settings = ServerSettings(model_path=Path("/m.gguf"), host="127.0.0.1", port=1, api_key="",
                              ctx_size=2048, parallel=1, threads=None)
    spec = LlamaServerEngine(Path("/bin/llama-server")).launch_spec(
        offload.server_settings(name, settings))
    return list(spec.argv)


def report(*vram_free: int) -> GpuReport:
    return GpuReport(tuple(GpuFacts(i, f"Test GPU {i}", free + GIB, free, "9.0")
                           for i, free in enumerate(vram_free)), "580.0", None)


def flags(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_one_gpu_every_layer_offloaded_and_only_the_ram_part_counted() -> None:
    smol = resolved("smol", SMOL)
    offload = plan_offload([smol], [Gpu("GPU", 8 * GIB)], 16 * GIB)
    n_all = smol.facts.n_layer + 1 if smol.facts else 0
    args = argv(offload, "smol")
    assert flags(args, "--n-gpu-layers") == str(n_all) and "--tensor-split" not in args
    whole = split_memory(smol.facts, 2048, 1, n_all) if smol.facts else None
    assert whole is not None
    chosen = offload.assignment("smol")
    assert chosen.mode == "plan" and chosen.vram == whole.vram and chosen.ram == whole.ram
    [applied] = offload.apply([smol])
    assert applied.required == whole.ram.total < smol.required
    assert "all 31 layers on GPU 0" in offload.lines()[1]


def test_two_gpus_a_model_neither_holds_alone_gets_a_tensor_split() -> None:
    smol = resolved("smol", SMOL)
    assert smol.facts is not None
    whole = split_memory(smol.facts, 2048, 1, smol.facts.n_layer + 1).vram
    # each GPU 1 MiB too small for the whole model, together enough (each pays a CUDA context)
    gpus = [Gpu("A", VRAM_RESERVE + whole - MIB), Gpu("B", VRAM_RESERVE + whole - MIB)]
    offload = plan_offload([smol], gpus, 16 * GIB)
    args = argv(offload, "smol")
    assert flags(args, "--n-gpu-layers") == "31"
    shares = [float(x) for x in (flags(args, "--tensor-split") or "").split(",")]
    assert len(shares) == 2 and all(share > 0 for share in shares)
    settings = offload.server_settings("smol", ServerSettings(
        model_path=Path("/m"), host="h", port=1, api_key="", ctx_size=2048, parallel=1,
        threads=None))
    # --tensor-split counts GPUs as NVML does (PCI bus order), not CUDA's fastest-first
    assert settings.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_fit_passes_nothing_and_counts_the_model_as_all_in_ram() -> None:
    gemma = resolved("gemma", GEMMA, gpu_layers="fit")
    offload = plan_offload([gemma], [Gpu("GPU", 8 * GIB)], 16 * GIB)
    args = argv(offload, "gemma")
    assert "--n-gpu-layers" not in args and "--tensor-split" not in args
    assert offload.assignment("gemma").mode == "fit"
    assert offload.apply([gemma])[0].required == gemma.required
    assert offload.assignment("gemma").line().startswith("--fit: llama-server's --fit")


def test_an_explicit_layer_count_is_passed_and_takes_its_vram_in_plan_order() -> None:
    gemma = resolved("gemma", GEMMA, gpu_layers=7)
    smol = resolved("smol", SMOL)
    assert gemma.facts is not None
    part = split_memory(gemma.facts, 2048, 1, 7)
    # room for gemma's 7 layers and not also for all of smol: smol gets what is left
    gpu = Gpu("GPU", VRAM_RESERVE + part.vram + 600 * MIB)
    offload = plan_offload([gemma, smol], [gpu], 16 * GIB)
    assert flags(argv(offload, "gemma"), "--n-gpu-layers") == "7"
    assert offload.assignment("gemma").ram == part.ram
    assert offload.apply([gemma])[0].required == part.ram.total < gemma.required
    smol_layers = int(flags(argv(offload, "smol"), "--n-gpu-layers") or -1)
    assert 0 <= smol_layers < 31
    # preload models are placed first: an on-demand explicit model comes after smol
    later = resolved("gemma", GEMMA, gpu_layers=7, preload=False)
    offload = plan_offload([later, smol], [gpu], 16 * GIB)
    assert offload.assignment("smol").gpu_layers == 31
    assert "more than the VRAM left" in offload.assignment("gemma").reason
    assert list(offload.assignments) == ["gemma", "smol"]  # reported in config order


def test_no_gpu_passes_nothing_and_says_nothing() -> None:
    smol = resolved("smol", SMOL)
    offload = plan_offload([smol], [], 16 * GIB)
    assert "--n-gpu-layers" not in argv(offload, "smol")
    assert offload.lines() == []
    assert offload.apply([smol])[0].required == smol.required
    # an explicit count is still the user's: passed, but counted as all in RAM
    counted = resolved("counted", SMOL, gpu_layers=12)
    offload = plan_offload([counted], [], 16 * GIB)
    assert flags(argv(offload, "counted"), "--n-gpu-layers") == "12"
    assert offload.apply([counted])[0].required == counted.required
    assert "no GPU seen" in offload.lines()[1]


def test_a_cpu_build_or_the_models_own_args_get_nothing_from_the_plan() -> None:
    smol = resolved("smol", SMOL)
    cpu_build = plan_offload([smol], [Gpu("GPU", 8 * GIB)], 16 * GIB, engine_gpu=False)
    assert "--n-gpu-layers" not in argv(cpu_build, "smol")
    assert "CPU build" in cpu_build.assignment("smol").reason
    own = resolved("own", SMOL, args=["--tensor-split", "3,1"])
    offload = plan_offload([own], [Gpu("GPU", 8 * GIB)], 16 * GIB)
    assert offload.assignment("own").mode == "args" and offload.assignment("own").gpu_layers is None


def test_a_gpu_box_admits_a_model_its_ram_alone_could_not_hold() -> None:
    smol = resolved("smol", SMOL)
    budget = Budget(smol.required - 1, "test")
    cpu = make_plan([smol.candidate()], budget)
    assert cpu.decision("smol").action == "cannot-fit"
    offload = plan_offload([smol], [Gpu("GPU", 8 * GIB)], budget.bytes)
    gpu = make_plan([m.candidate() for m in offload.apply([smol])], budget)
    assert gpu.decision("smol").action == "start"
    assert gpu.decision("smol").required == offload.assignment("smol").ram.total  # type: ignore[union-attr]


def test_a_cpu_run_measurement_is_not_used_for_an_offloaded_one(tmp_path: Path) -> None:
    smol = resolved("smol", SMOL)
    assert smol.path is not None
    measurements = Measurements(tmp_path)
    key = measurement_key(smol.path, "llama-server", 2048, 1)
    measurements.record(key, 900 * MIB)  # measured on the CPU
    offload = plan_offload([smol], [Gpu("GPU", 8 * GIB)], 16 * GIB)
    [applied] = offload.apply([smol], measurements)
    assert applied.measured is None and applied.required < 900 * MIB
    measurements.record(offload.measurement_key("smol", key), 120 * MIB)
    assert offload.apply([smol], measurements)[0].required == 120 * MIB


@pytest.mark.parametrize(("value", "message"), [
    ("many", "must be 'auto', 'fit' or a number of layers from 0 to 10000, got 'many'"),
    ("-1", "must be 'auto', 'fit' or a number of layers from 0 to 10000, got -1"),
    ("true", "must be 'auto', 'fit' or a number of layers from 0 to 10000, got True"),
])
def test_bad_gpu_layers_are_config_errors_naming_the_path(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"models:\n  a:\n    file: a.gguf\n    gpu_layers: {value}\n", label="x")
    assert "models.a.gpu_layers" in str(caught.value) and message in str(caught.value)


def test_gpu_layers_conflicts_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="gpu_layers needs engine llama-server, not llamafile"):
        parse_config("models:\n  a: {file: a.llamafile, gpu_layers: 3}\n", label="x")
    with pytest.raises(ConfigError, match="gpu_layers and args '--split-mode=row' both set"):
        parse_config("models:\n  a: {file: a.gguf, gpu_layers: fit, args: [--split-mode=row]}\n",
                     label="x")
    # -ngl itself is what gpu_layers says: refused in args, whatever gpu_layers is
    with pytest.raises(ConfigError, match=r"models\.a\.args: --n-gpu-layers=4 .* use "
                                          r"models\.a\.gpu_layers instead"):
        parse_config("models:\n  a: {file: a.gguf, args: [--n-gpu-layers=4]}\n", label="x")
    assert parse_config("models:\n  a: {file: a.gguf, gpu_layers: 0}\n",
                        label="x").models["a"].gpu_layers == 0


def test_cuda_visible_devices_narrows_and_orders_the_gpus() -> None:
    facts = report(10 * GIB, 20 * GIB, 30 * GIB)
    gpus, why = visible_gpus(facts, {"CUDA_VISIBLE_DEVICES": "2,0"})
    assert [g.vram for g in gpus] == [30 * GIB, 10 * GIB] and why is None
    gpus, why = visible_gpus(facts, {"CUDA_VISIBLE_DEVICES": "GPU-8d3a"})
    assert gpus == [] and why is not None and "UUID" in why
    assert visible_gpus(facts, {"CUDA_VISIBLE_DEVICES": ""})[0] == []


def test_up_argv_per_model_through_the_server_factory(tmp_path: Path, small_model: Path) -> None:
    text = (f"models:\n  a: {{file: {small_model}}}\n  b: {{file: {small_model}, gpu_layers: fit}}\n"
            f"  c: {{file: {small_model}, gpu_layers: 2}}\n")
    loaded = LoadedConfig(parse_config(text, label="x", total_ram=64 * GIB), tmp_path / "x.yaml")
    models = resolve_models(loaded)
    offload = machine_offload(loaded, models, 8 * GIB, report=lambda: report(4 * GIB, 4 * GIB),
                              env={}, engine=(True, "llama-server cuda build"))
    factory = ServerFactory(loaded, {"llama-server": LlamaServerEngine(Path("/bin/llama-server"))},
                            SupervisorEvents(ChildRecords(tmp_path)), CpuShare(1, 1, 2),
                            offload=offload)
    argvs = {}
    for model in offload.apply(models):
        _, managed, _ = factory.make(model)
        argvs[model.name] = list(managed.engine.launch_spec(managed.settings).argv)
    assert flags(argvs["a"], "--n-gpu-layers") == str((models[0].facts.n_layer if models[0].facts
                                                       else 0) + 1)
    assert "--n-gpu-layers" not in argvs["b"]
    assert flags(argvs["c"], "--n-gpu-layers") == "2" and "--tensor-split" not in argvs["c"]
    assert offload.lines()[0].startswith("gpu: GPU 0: Test GPU 0 (4.00 GiB free); GPU 1")
    # `lalo reload` replans on the VRAM seen at start: unchanged models keep their settings
    assert offload.replan(models).assignments == offload.assignments
    # no driver: the same config passes nothing
    none = machine_offload(loaded, models, 8 * GIB,
                           report=lambda: GpuReport((), None, "no NVIDIA driver"), env={})
    assert none.assignment("a").gpu_layers is None and none.lines()[0] == "gpu: none (no NVIDIA driver)"
