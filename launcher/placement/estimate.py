"""Memory a llama-server needs for a model: weights + KV cache + recurrent state + compute + overhead.

Pure functions over `ModelFacts` (from a GGUF header or a catalog entry). The constants
were calibrated against RSS of the llama-server lalo builds (bench/calibrate_estimate.py,
docs/memory-estimate.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from launcher.config.server_args import ArgsMemory, read_args
from launcher.machine.hardware import cpu_info
from launcher.models.shape import (
    CHECKPOINTS_PER_SLOT,
    CTX_PAD,
    MIB,
    QUANT_BITS,
    UBATCH,
    ModelFacts,
    approximate_matmul_bytes,
    padded_ctx,
)

if TYPE_CHECKING:
    from launcher.config import ModelConfig


# Calibrated constants (bench/calibrate_estimate.py); see docs/memory-estimate.md.
PROCESS_OVERHEAD = 18 * MIB  # binary, libc, threads, HTTP server, chat template engine
VOCAB_OVERHEAD_PER_TOKEN = 200  # tokenizer tables in RAM, bytes per vocab entry
# a BPE tokenizer's merges: llama-vocab's `bpe_ranks` map (a ~112-byte node per merge) and the
# merge strings read from the GGUF; fitted on SmolLM2 (48,900 merges: 9 MiB the per-token figure,
# fitted on SentencePiece vocabularies without merges, left out)
MERGE_OVERHEAD = 180
CTX_OVERHEAD_PER_TOKEN = 400  # prompt-cache bookkeeping that grows with the context
COMPUTE_PER_EMBD = 4 * 5.5  # graph activations: bytes per (ubatch token x n_embd)
COMPUTE_PER_FF = 4 * 2.45  # bytes per (ubatch token x n_ff)
COMPUTE_PER_VOCAB = 16  # bytes per vocab entry
MASK_BYTES = 2  # the f16 attention mask: ubatch x context

# Tensor types llama.cpp's CPU backend repacks into an interleaved copy (repack.cpp), by CPU.
# The copy is anonymous memory; the file pages it came from stay mapped (and in RSS).
_REPACK_X86_AVX2 = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"})
_REPACK_ARM_DOTPROD = frozenset({"Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q8_0", "MXFP4"})


def repack_types_for(machine: str, features: frozenset[str] | set[str]) -> frozenset[str]:
    """Which tensor types llama.cpp repacks on a CPU with `features` (cpuinfo flag names)."""
    if machine in ("x86_64", "amd64") and "avx2" in features:
        return _REPACK_X86_AVX2 | ({"Q2_K"} if "avx512f" in features else set())
    if machine in ("arm64", "aarch64") and ("dotprod" in features or "asimddp" in features):
        return _REPACK_ARM_DOTPROD
    return frozenset()


@functools.cache
def local_repack_types() -> frozenset[str]:
    info = cpu_info()
    return repack_types_for(info.machine, set(info.features))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes, by component; `total` is what the planner reserves for the model."""

    weights: int
    repacked: int  # a second, interleaved copy of some weights (see repack_types_for)
    kv_cache: int
    recurrent_state: int
    compute: int
    overhead: int
    ctx_size: int
    parallel: int
    checkpoints: int = 0  # llama-server's saved sliding-window state (SWA models only)

    @property
    def total(self) -> int:
        return (self.weights + self.repacked + self.kv_cache + self.recurrent_state
                + self.compute + self.overhead + self.checkpoints)

    def as_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "repacked": self.repacked,
            "kv_cache": self.kv_cache,
            "recurrent_state": self.recurrent_state,
            "compute": self.compute,
            "overhead": self.overhead,
            "checkpoints": self.checkpoints,
            "total": self.total,
            "ctx_size": self.ctx_size,
            "parallel": self.parallel,
        }



@dataclass(frozen=True)
class MemorySettings:
    """Everything llama-server is told that decides its memory: a model's settings and what
    lalo reads from its `args`. Every estimate of a configured model comes through here, so
    `plan`, `up`, `/api/status` and the packaging targets count the same server."""

    ctx_size: int
    parallel: int = 1
    kv_type: str = "f16"
    args: ArgsMemory = field(default_factory=ArgsMemory)

    @classmethod
    def of(cls, cfg: ModelConfig) -> MemorySettings:
        return cls(cfg.ctx_size, cfg.parallel, cfg.kv_cache, read_args(cfg.args))

    def key(self) -> str:
        """What differs from the defaults lalo's keys assumed before (f16, no memory args)."""
        parts = [f"kv={self.kv_type}" if self.kv_type != "f16" else "", self.args.key()]
        return "|".join(part for part in parts if part)

    def note(self) -> str:
        """The settings besides ctx_size and parallel that are not llama-server's defaults, for
        humans ("kv_cache q8_0, -ub 256"); empty when there are none."""
        args = self.args
        parts = [f"kv_cache {self.kv_type}" if self.kv_type != "f16" else "",
                 f"-ub {args.ubatch}" if args.ubatch != UBATCH else "",
                 "--swa-full" if args.swa_full else "", "" if args.repack else "--no-repack",
                 f"-ctxcp {args.checkpoints}" if args.checkpoints != CHECKPOINTS_PER_SLOT else ""]
        return ", ".join(part for part in parts if part)

    def facts_and_repack(self, facts: ModelFacts, repack_types: frozenset[str] | None
                         ) -> tuple[ModelFacts, frozenset[str] | None]:
        """`--swa-full` makes every layer keep the whole context (and no checkpoints are made);
        `--no-repack` keeps no interleaved copy."""
        if self.args.swa_full:
            facts = replace(facts, sliding_window=0, swa_layers=())
        return facts, (repack_types if self.args.repack else frozenset())


def estimate_for(facts: ModelFacts, settings: MemorySettings,
                 repack_types: frozenset[str] | None = None) -> MemoryEstimate:
    """`estimate_memory` for a model's settings (see MemorySettings)."""
    facts, repack = settings.facts_and_repack(facts, repack_types)
    return estimate_memory(facts, settings.ctx_size, settings.parallel, settings.kv_type, repack,
                           ubatch=settings.args.ubatch,
                           checkpoints_per_slot=settings.args.checkpoints)


def estimate_memory(
    facts: ModelFacts,
    ctx_size: int,
    parallel: int = 1,
    kv_type: str = "f16",
    repack_types: frozenset[str] | None = None,
    *,
    ubatch: int = UBATCH,
    checkpoints_per_slot: int = CHECKPOINTS_PER_SLOT,
) -> MemoryEstimate:
    """Resident memory (RSS) of llama-server serving `facts` with `-c ctx_size -np parallel`,
    K and V of `kv_type`, micro-batches of `ubatch` tokens.

    Each slot has its own KV stream of ctx_size / parallel cells (the KV cache depends on
    `ctx_size` only); recurrent state and output buffers scale with `parallel`.
    `repack_types`: tensor types this CPU repacks (default: this machine's).
    """
    ctx = padded_ctx(ctx_size)
    kinds = local_repack_types() if repack_types is None else repack_types
    repacked = sum(size for kind, size in facts.matmul_bytes_by_type.items() if kind in kinds)
    global_cells, swa_cells = facts.kv_cells(ctx_size, parallel, ubatch)
    kv = int(global_cells * facts.kv_bytes_per_token(kv_type, sliding=False)
             + swa_cells * facts.kv_bytes_per_token(kv_type, sliding=True))
    recurrent_layers = facts.n_layer - facts.attention_layers
    recurrent = facts.recurrent_state_per_layer * recurrent_layers * parallel
    ubatch = min(ubatch, ctx)
    # llama-server caps each slot's context at the model's training context (server-context.cpp,
    # `n_ctx_slot()`): cells past it are allocated and cleared (resident, in `kv`) but never
    # attended to, so the mask's columns for them and the prompt bookkeeping are never touched
    # (SmolLM2, trained at 8192, at -c 32768: 24 MiB of the compute buffer not resident)
    used = min(ctx, padded_ctx(facts.n_ctx_train) * max(1, parallel)) if facts.n_ctx_train else ctx
    compute = int(
        ubatch * (facts.n_embd * COMPUTE_PER_EMBD + facts.n_ff * COMPUTE_PER_FF)
        + facts.n_vocab * COMPUTE_PER_VOCAB
        + ubatch * used * MASK_BYTES
        + ubatch * swa_cells // max(1, parallel) * MASK_BYTES  # the sliding layers' own mask
    )
    # context checkpoints of the sliding layers' state, kept per slot after a prompt: each holds
    # the window's cells (measured: 7.5 MiB for Gemma 3 270M, 512 cells x 15 layers x 1 KiB)
    window_cells = min(facts.sliding_window, swa_cells // max(1, parallel))
    checkpoints = int(checkpoints_per_slot * max(1, parallel) * window_cells
                      * facts.kv_bytes_per_token(kv_type, sliding=True))
    overhead = (PROCESS_OVERHEAD + facts.n_vocab * VOCAB_OVERHEAD_PER_TOKEN
                + facts.n_merges * MERGE_OVERHEAD
                + used * CTX_OVERHEAD_PER_TOKEN
                + parallel * facts.n_vocab * 4)  # logits of each slot's last token
    return MemoryEstimate(
        weights=facts.weight_bytes,
        repacked=repacked,
        kv_cache=kv,
        recurrent_state=recurrent,
        compute=compute,
        overhead=overhead,
        ctx_size=ctx_size,
        parallel=parallel,
        checkpoints=checkpoints,
    )


def largest_fitting_ctx(facts: ModelFacts, budget: int, settings: MemorySettings) -> int | None:
    """The largest ctx_size (a multiple of 256, at least 256) whose estimate with the model's
    other `settings` fits `budget`."""
    def total(ctx: int) -> int:
        return estimate_for(facts, replace(settings, ctx_size=ctx)).total

    low, high = 1, max(1, (facts.n_ctx_train or 131072) // CTX_PAD)
    if total(low * CTX_PAD) > budget:
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if total(middle * CTX_PAD) <= budget:
            low = middle
        else:
            high = middle - 1
    return low * CTX_PAD


def fitting_quantizations(facts: ModelFacts, budget: int, settings: MemorySettings
                          ) -> list[tuple[str, int]]:
    """Smaller file types whose estimate with `settings` fits, best quality first: (type, bytes)."""
    current = QUANT_BITS.get(facts.file_type)
    found: list[tuple[str, int]] = []
    for name, bits in sorted(QUANT_BITS.items(), key=lambda item: -item[1]):
        if current is not None and bits >= current:
            continue
        weights = int(facts.parameters * bits / 8)
        smaller = replace(facts, weight_bytes=weights, file_type=name,
                          matmul_bytes_by_type=approximate_matmul_bytes(name, weights))
        total = estimate_for(smaller, settings).total
        if total <= budget:
            found.append((name, total))
    return found


