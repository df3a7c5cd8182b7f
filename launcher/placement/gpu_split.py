"""A model's memory split between GPUs and RAM for llama-server's `-ngl N --tensor-split ...`:
per GPU its layers' weights and KV cache, a compute buffer and the CUDA context; in RAM the rest.

Pure functions over `ModelFacts`, built on `launcher.placement.estimate` (the all-in-RAM figure).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from launcher.models.shape import CHECKPOINTS_PER_SLOT, MIB, UBATCH, ModelFacts, padded_ctx
from launcher.placement.estimate import (
    COMPUTE_PER_EMBD,
    COMPUTE_PER_FF,
    COMPUTE_PER_VOCAB,
    MASK_BYTES,
    MemoryEstimate,
    MemorySettings,
    estimate_memory,
)

# Not measured on a GPU (no GPU where these were written): the CUDA context is the driver's and
# the runtime's own memory on each GPU a process uses, a few hundred MiB with CUDA 12/13's lazy
# module loading (the PyTorch and llama.cpp issue reports give 300-500 MiB); the larger figure.
CUDA_CONTEXT = 500 * MIB


@dataclass(frozen=True)
class DeviceShare:
    """What one GPU holds of a model: its layers' weights and KV, a compute buffer, the context."""

    layers: int  # repeating layers on this GPU
    output: bool  # whether the output layer is here
    weights: int
    kv_cache: int
    compute: int
    context: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.context

    def as_dict(self) -> dict[str, int | bool]:
        return {"layers": self.layers, "output": self.output, "weights": self.weights,
                "kv_cache": self.kv_cache, "compute": self.compute, "context": self.context,
                "total": self.total}


@dataclass(frozen=True)
class OffloadSplit:
    """A model's memory with `-ngl gpu_layers --tensor-split ...`: per GPU, and what stays in RAM."""

    gpu_layers: int  # llama.cpp's -ngl: the last N of the n_layer + 1 layers (the output counts)
    tensor_split: tuple[float, ...]
    devices: tuple[DeviceShare, ...]
    ram: MemoryEstimate

    @property
    def vram(self) -> int:
        return sum(device.total for device in self.devices)


def layer_devices(n_layer: int, gpu_layers: int, split: tuple[float, ...]) -> tuple[int, ...]:
    """The device of each of the n_layer + 1 layers (the last is the output layer), -1 = CPU.

    llama-model.cpp `load_tensors`: the last `ngl` layers are offloaded, and offloaded layer il
    goes to the first GPU whose cumulative split share exceeds (il - i_gpu_start) / ngl.
    """
    n_all = n_layer + 1
    ngl = max(0, min(gpu_layers, n_all))
    if ngl == 0 or not split:
        return (-1,) * n_all
    total = sum(split)
    if total <= 0:
        raise ValueError("a tensor split needs a positive share")
    bounds, running = [], 0.0
    for share in split:
        running += share
        bounds.append(running / total)
    start = n_all - ngl
    devices = []
    for il in range(n_all):
        if il < start:
            devices.append(-1)
            continue
        position = (il - start) / ngl
        index = next((i for i, bound in enumerate(bounds) if bound > position), len(split) - 1)
        devices.append(index)
    return tuple(devices)


def split_memory(
    facts: ModelFacts,
    ctx_size: int,
    parallel: int = 1,
    gpu_layers: int = 0,
    tensor_split: tuple[float, ...] = (1.0,),
    kv_type: str = "f16",
    repack_types: frozenset[str] | None = None,
    *,
    ubatch: int = UBATCH,
    checkpoints_per_slot: int = CHECKPOINTS_PER_SLOT,
) -> OffloadSplit:
    """`estimate_memory` split between GPUs and RAM for `-ngl gpu_layers --tensor-split ...`.

    On each GPU: its layers' weights and KV cache, a CUDA compute buffer (the graph of one
    ubatch, sized like the CPU's; the GPU holding the output layer also the vocabulary part),
    and the CUDA context. In RAM: the CPU estimate less what moved, with the input layer
    (always on the CPU) and, while any layer stays, the CPU compute buffer. At `gpu_layers=0`
    the RAM part is exactly `estimate_memory`.
    """
    cpu = estimate_memory(facts, ctx_size, parallel, kv_type, repack_types, ubatch=ubatch,
                          checkpoints_per_slot=checkpoints_per_slot)
    placement = layer_devices(facts.n_layer, gpu_layers, tensor_split)
    if all(device < 0 for device in placement):
        return OffloadSplit(0, tensor_split, (), cpu)
    _, layer_weights, output_weights = facts.weight_layout()
    kv = facts.kv_layer_bytes(ctx_size, parallel, kv_type, ubatch)
    ctx = padded_ctx(ctx_size)
    _, swa_cells = facts.kv_cells(ctx_size, parallel, ubatch)
    ubatch = min(ubatch, ctx)
    activations = int(ubatch * (facts.n_embd * COMPUTE_PER_EMBD + facts.n_ff * COMPUTE_PER_FF)
                      + ubatch * ctx * MASK_BYTES + ubatch * swa_cells // max(1, parallel) * MASK_BYTES)
    vocab_part = facts.n_vocab * COMPUTE_PER_VOCAB
    shares: list[DeviceShare] = []
    moved_weights = moved_kv = 0
    for index in range(len(tensor_split)):
        layers = [il for il in range(facts.n_layer) if placement[il] == index]
        has_output = placement[facts.n_layer] == index
        if not layers and not has_output:
            shares.append(DeviceShare(0, False, 0, 0, 0, 0))
            continue
        weights = sum(layer_weights[il] for il in layers) + (output_weights if has_output else 0)
        kv_bytes = sum(kv[il] for il in layers)
        moved_weights += weights - (output_weights if has_output and facts.output_tied else 0)
        moved_kv += kv_bytes
        shares.append(DeviceShare(len(layers), has_output, weights, kv_bytes,
                                  activations + (vocab_part if has_output else 0), CUDA_CONTEXT))
    cpu_layers = sum(1 for il in range(facts.n_layer) if placement[il] < 0)
    # all layers offloaded: the CPU keeps a small host buffer (the input embeddings of a ubatch)
    cpu_compute = cpu.compute if cpu_layers else ubatch * facts.n_embd * 4 * 2
    kept = 1 - moved_weights / max(1, facts.weight_bytes)
    ram = replace(cpu, weights=max(0, facts.weight_bytes - moved_weights),
                  repacked=int(cpu.repacked * max(0.0, kept)),
                  kv_cache=max(0, cpu.kv_cache - moved_kv), compute=cpu_compute)
    return OffloadSplit(min(gpu_layers, facts.n_layer + 1), tensor_split, tuple(shares), ram)


def split_for(facts: ModelFacts, settings: MemorySettings, gpu_layers: int = 0,
              tensor_split: tuple[float, ...] = (1.0,),
              repack_types: frozenset[str] | None = None) -> OffloadSplit:
    """`split_memory` for a model's settings (see MemorySettings)."""
    facts, repack = settings.facts_and_repack(facts, repack_types)
    return split_memory(facts, settings.ctx_size, settings.parallel, gpu_layers, tensor_split,
                        settings.kv_type, repack, ubatch=settings.args.ubatch,
                        checkpoints_per_slot=settings.args.checkpoints)
