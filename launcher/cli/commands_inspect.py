"""`lalo inspect FILE` and `lalo plan`: what a model is, and what would load within the RAM budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from launcher.cli.app import app
from launcher.config import KvCacheType, LoadedConfig, load_config
from launcher.errors import UsageError
from launcher.machine.memory import system_memory
from launcher.models.facts import catalog_weights
from launcher.models.gguf_file import read_gguf
from launcher.models.shape import ModelFacts
from launcher.placement.context import fit_contexts
from launcher.placement.cpu_share import CpuShare, config_share, policy_line
from launcher.placement.cpu_share import to_json as cpu_json
from launcher.placement.estimate import estimate_memory
from launcher.placement.gpu_offload import Offload, gpus_note, machine_offload, plan_offload
from launcher.placement.gpu_plan import VRAM_RESERVE, Gpu
from launcher.placement.measurements import Measurements, with_measurements
from launcher.placement.planner import Plan, compute_budget, make_plan
from launcher.placement.resolve import catalog_for, resolve_models
from launcher.serve.demo import demo_config
from launcher.units import format_size, parse_size

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Config file (default: lookup order).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="A GGUF model file.")],
    ctx_size: Annotated[int, typer.Option("--ctx-size", min=128, help="Context for the estimate.")] = 2048,
    parallel: Annotated[int, typer.Option("--parallel", min=1, help="Slots for the estimate.")] = 1,
    kv_cache: Annotated[KvCacheType, typer.Option(
        "--kv-cache", help="K and V cache type for the estimate (lalo.yaml's kv_cache).")] = "f16",
    as_json: JsonOption = False,
) -> None:
    """Facts from a GGUF header (instant, reads no weights) and a memory estimate."""
    info = read_gguf(file)
    facts = ModelFacts.from_gguf(info)
    estimate = estimate_memory(facts, ctx_size, parallel, kv_cache)
    if as_json:
        typer.echo(json.dumps({**info.summary(), "estimate": estimate.as_dict(),
                               "kv_cache": kv_cache, "catalog_weights": catalog_weights(facts)},
                              indent=2))
        return
    s = info.summary()
    rows = [
        ("file", f"{s['path']} ({format_size(s['file_size'])})"),
        ("name", s["name"] or "-"),
        ("architecture", s["architecture"]),
        ("parameters", f"{s['parameters']:,}"),
        ("quantization", f"{s['file_type']} ({s['bits_per_weight']} bits/weight)"),
        ("layers", f"{s['layers']} ({s['attention_layers']} with attention)"),
        ("embedding", s["embedding_length"]),
        ("feed forward", s["feed_forward_length"]),
        ("heads / kv heads", f"{s['heads']} / {s['kv_heads']}"),
        ("training context", s["context_length"]),
        ("vocabulary", s["vocab_size"]),
        ("chat template", "yes" if s["chat_template"] else "no"),
        ("tensor data", f"{format_size(s['tensor_bytes'])} in {s['tensors']} tensors"),
    ]
    if s["synthetic"]:
        rows.append(("note", "random weights (made by lalo for tests; produces noise)"))
    rows.append((
        "memory estimate",
        f"{format_size(estimate.total)} at ctx_size {ctx_size}, parallel {parallel}, "
        f"kv_cache {kv_cache}: "
        f"weights {format_size(estimate.weights)} + repacked {format_size(estimate.repacked)} + "
        f"KV {format_size(estimate.kv_cache)} + "
        f"state {format_size(estimate.recurrent_state)} + compute {format_size(estimate.compute)} + "
        f"overhead {format_size(estimate.overhead)}"
        + (f" + SWA checkpoints {format_size(estimate.checkpoints)}" if estimate.checkpoints else ""),
    ))
    if facts.sliding_window:
        rows.append(("sliding window", f"{facts.sliding_window} tokens on {sum(facts.swa_layers)} of "
                     f"{facts.n_layer} layers (their KV cache holds the window only)"))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def load(config: Path | None) -> LoadedConfig:
    """The config by lookup order; the built-in default is the demo."""
    return load_config(config, default=demo_config)


GpuOption = Annotated[list[str] | None, typer.Option(
    "--gpu", help="Plan for a GPU of this much VRAM (e.g. 24GiB; repeat for several) instead of "
    "the GPUs this machine has.")]


def given_gpus(sizes: list[str]) -> list[Gpu]:
    """GPUs given as sizes: a box being sized."""
    gpus = []
    for text in sizes:
        try:
            vram = parse_size(text)
        except ValueError as exc:
            raise UsageError(f"--gpu: {exc}") from None
        if vram <= 0:
            raise UsageError(f"--gpu: a GPU needs some VRAM, got {text!r}")
        gpus.append(Gpu(f"GPU of {format_size(vram)}", vram))
    return gpus


def build_plan(loaded: LoadedConfig, gpu_sizes: list[str] | None = None
               ) -> tuple[Plan, CpuShare, Offload]:
    """What `lalo up` would do: each model's GPU settings (this machine's GPUs, or the ones
    given), then the RAM plan counting only the RAM part of offloaded models."""
    resources = loaded.config.resources
    memory = system_memory()
    available = memory.available
    budget = compute_budget(resources.ram_budget, resources.ram_reserve, available,
                            memory.limit_note())
    measurements = Measurements()
    models = fit_contexts(resolve_models(loaded, catalog=catalog_for(loaded)), budget.bytes)
    models = with_measurements(models, measurements)
    if gpu_sizes:
        gpus = given_gpus(gpu_sizes)
        offload = plan_offload(models, gpus, budget.bytes,
                               note=f"{gpus_note(gpus)}; given with --gpu (a CUDA llama-server "
                               "assumed)")
    else:
        offload = machine_offload(loaded, models, available)
    models = offload.apply(models, measurements)
    share = config_share(models, resources.max_loaded)
    return make_plan([m.candidate() for m in models], budget, resources.max_loaded), share, offload


def thread_policies(loaded: LoadedConfig) -> dict[str, str]:
    """Per model, how its threads are set: "governed" (lalo's engine, which `lalo up` uses or
    builds, and `threads: auto`) or "static" (fixed at start: another engine, or a number)."""
    from launcher.engines.patch_series import THREADS_ROUTE, series
    from launcher.engines.registry import find_llama_server

    engines = loaded.config.engines.llama_server
    found = find_llama_server(engines.path, engines.variant, probe=lambda binary: None)
    patched = THREADS_ROUTE in found.patches if found is not None else \
        any(patch.name == THREADS_ROUTE for patch in series())  # `lalo up` builds it
    return {name: "governed" if model.engine_kind == "llama-server" and patched
            and model.thread_count is None else "static"
            for name, model in loaded.config.models.items()}


@app.command()
def plan(config: ConfigOption = None, as_json: JsonOption = False, gpu: GpuOption = None) -> None:
    """What `lalo up` would load now, each model's memory estimate, and what does not fit;
    with GPUs (this machine's, or `--gpu SIZE`), each model's layers per GPU and in RAM."""
    loaded = load(config)
    result, share, offload = build_plan(loaded, gpu)
    gpu_plan = offload.gpu_plan
    if as_json:
        gpu_json = gpu_plan.to_json() if gpu_plan else (
            {"gpus": [{"name": g.name, "vram": g.vram} for g in offload.gpus], "models": []}
            if offload.gpus else None)
        typer.echo(json.dumps({"config": loaded.describe_source(), **result.to_json(),
                               "cpu": {**cpu_json(share), "thread_policy": thread_policies(loaded)},
                               "gpu": gpu_json,
                               "offload": offload.to_json()}, indent=2))
        return
    typer.echo(f"config: {loaded.describe_source()}")
    typer.echo(f"budget: {format_size(result.budget.bytes)} ({result.budget.source})")
    if result.max_loaded:
        typer.echo(f"max_loaded: {result.max_loaded}")
    if not result.decisions:
        typer.echo("no models configured")
        return
    width = max(len(d.name) for d in result.decisions)
    for decision in result.decisions:
        typer.echo(f"  {decision.name:<{width}}  {decision.action:<10} {format_size(decision.required):>10}  "
                   f"{decision.reason}")
        if decision.ctx_note:
            typer.echo(f"  {'':<{width}}  {'':<10} {'':>10}  {decision.ctx_note}")
        for hint in decision.suggestions:
            typer.echo(f"  {'':<{width}}  {'':<10} {'':>10}  - {hint}")
    typer.echo(f"preload total: {format_size(result.preload_total)}, "
               f"left for on-demand models: {format_size(result.remaining)}")
    policies = thread_policies(loaded)
    governed = [name for name, policy in policies.items() if policy == "governed"]
    if governed:
        typer.echo(f"cpu: threads from what is busy for {', '.join(governed)} (lalo's engine: "
                   "one busy alone gets every CPU, busy ones share them)")
    if len(governed) < len(policies):
        typer.echo(f"cpu: {policy_line(share)}")
    if offload.lines():  # GPUs, or a model that sets gpu_layers
        print_offload(offload)


def print_offload(offload: Offload) -> None:
    """Per model: the llama-server flags, VRAM and RAM, and why (lalo's plan, fit, configured)."""
    typer.echo("")
    typer.echo(f"gpus: {offload.note}")
    if not offload.assignments:
        return
    width = max(len(name) for name in offload.assignments)
    flags = {name: a.flags() for name, a in offload.assignments.items()}
    flag_width = max(len(f) for f in flags.values())
    for name, a in offload.assignments.items():
        ram = format_size(a.ram.total) if a.ram is not None else "all"
        typer.echo(f"  {name:<{width}}  {flags[name]:<{flag_width}}  VRAM {format_size(a.vram):>9}  "
                   f"RAM {ram:>9}  {a.reason}")
    if offload.vram_left:
        typer.echo("VRAM left: " + ", ".join(f"GPU {i} {format_size(max(0, v - VRAM_RESERVE))}"
                                             for i, v in enumerate(offload.vram_left)))
