"""Memory a llama-server needs for a model: weights + KV cache + recurrent state + compute + overhead.

Pure functions over `ModelFacts` (from a GGUF header or a catalog entry). The constants
were calibrated against RSS of the llama-server lalo builds (bench/calibrate_estimate.py,
docs/memory-estimate.md).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from launcher.engines.server_flags import DEFAULT_CHECKPOINTS, DEFAULT_UBATCH, ArgsMemory, read_args
from launcher.hardware import cpu_info
from launcher.models.gguf_file import GGUFInfo

if TYPE_CHECKING:
    from launcher.config import ModelConfig

MIB = 1024**2
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
CTX_PAD = 256  # llama.cpp pads the context to a multiple of 256
UBATCH = DEFAULT_UBATCH  # llama-server's default -ub: the compute graph is sized for this many tokens
# Sliding-window attention: llama.cpp's default layer pattern per architecture when the GGUF
# has no `attention.sliding_window_pattern` (src/models/*.cpp, `load_swa_pattern(ml, N)`):
# with pattern N, layer il slides when il % N < N - 1 (every N-th layer is global).
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "gemma-embedding": 6, "cohere2": 4, "gpt-oss": 2,
                "exaone4": 4}
# llama-server saves the SWA layers' state in "context checkpoints" while it reads a prompt
# (server-context.cpp): two near the prompt's end (n_ubatch + 4 and 4 tokens before it) and one
# at the start of the last user message; further ones only at user messages 8192 tokens apart,
# at most 32 per slot. Each holds the window's cells of the SWA layers.
CHECKPOINTS_PER_SLOT = DEFAULT_CHECKPOINTS  # 3

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


# Approximate bits per weight of llama.cpp's file types (for "what would fit" hints).
QUANT_BITS = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 8.5,
    "Q6_K": 6.56,
    "Q5_K_M": 5.69,
    "Q5_K_S": 5.54,
    "Q4_K_M": 4.85,
    "Q4_K_S": 4.58,
    "Q4_1": 5.0,
    "Q4_0": 4.55,
    "IQ4_XS": 4.25,
    "Q3_K_M": 3.91,
    "Q3_K_S": 3.5,
    "Q2_K": 2.96,
}


def conv_state_bytes(l_cache: int, n_embd: int) -> int:
    """Per-sequence state of one short-convolution layer (lfm2): the last `l_cache - 1` inputs
    of width n_embd, f32 (llama.cpp's llama_memory_recurrent r_l)."""
    return (l_cache - 1) * n_embd * 4


@dataclass(frozen=True)
class ModelFacts:
    """The architecture facts that decide memory, from a GGUF header or a catalog entry."""

    architecture: str
    parameters: int
    weight_bytes: int
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_vocab: int
    # per layer: (kv heads, key length, value length); kv heads 0 = no attention (recurrent/conv)
    kv_heads: tuple[int, ...]
    key_length: int
    value_length: int
    n_ctx_train: int = 0
    n_merges: int = 0  # BPE tokenizer merges (0 for SentencePiece vocabularies)
    # bytes of per-sequence recurrent state per non-attention layer (conv / SSM), f32
    recurrent_state_per_layer: int = 0
    file_type: str = "unknown"
    # bytes of matrix-multiply weights by tensor type: what the CPU backend may repack
    matmul_bytes_by_type: Mapping[str, int] = field(default_factory=dict)
    # sliding-window attention: the window (tokens; 0 = none) and, per layer, whether it slides
    sliding_window: int = 0
    swa_layers: tuple[bool, ...] = ()
    # where the weights sit, for offloading (llama-model.cpp): the input layer (token_embd,
    # always on the CPU), each repeating layer `blk.N.*`, the output layer (output + output_norm;
    # a tied output is token_embd loaded a second time, on the output layer's device).
    # Empty: known only from the file size (a catalog entry), see `weight_layout`.
    input_bytes: int = 0
    layer_bytes: tuple[int, ...] = ()
    output_bytes: int = 0
    output_tied: bool = False

    @classmethod
    def from_gguf(cls, info: GGUFInfo) -> ModelFacts:
        kv_heads = tuple(info.head_count_kv_per_layer())
        recurrent = 0
        if info.architecture.startswith("lfm2"):
            l_cache = int(info.arch_value("shortconv.l_cache", 3))
            recurrent = conv_state_bytes(l_cache, info.embedding_length)
        window = int(info.arch_value("attention.sliding_window", 0) or 0)
        pattern = info.arch_value("attention.sliding_window_pattern", SWA_PATTERNS.get(info.architecture))
        swa = swa_layer_flags(info.block_count, pattern) if window > 0 and pattern is not None else ()
        input_bytes, layer_bytes, output_bytes, tied = _weight_layout(info)
        return cls(
            input_bytes=input_bytes,
            layer_bytes=layer_bytes,
            output_bytes=output_bytes,
            output_tied=tied,
            sliding_window=window if any(swa) else 0,
            swa_layers=swa if any(swa) else (),
            matmul_bytes_by_type=_repackable_bytes(info),
            architecture=info.architecture,
            parameters=info.parameter_count,
            weight_bytes=info.tensor_bytes,
            n_layer=info.block_count,
            n_embd=info.embedding_length,
            n_ff=info.feed_forward_length,
            n_head=info.head_count,
            n_vocab=info.vocab_size,
            kv_heads=kv_heads,
            key_length=info.key_length,
            value_length=info.value_length,
            n_ctx_train=info.context_length,
            n_merges=int(info.array_lengths.get("tokenizer.ggml.merges", 0)),
            recurrent_state_per_layer=recurrent,
            file_type=info.file_type,
        )

    @property
    def attention_layers(self) -> int:
        return sum(1 for heads in self.kv_heads if heads)

    def kv_bytes_per_token(self, kv_type: str = "f16", *, sliding: bool | None = None) -> float:
        """KV bytes per cache cell over the layers with attention; `sliding` True/False counts
        only the sliding-window / only the global layers (None: all of them)."""
        width = KV_TYPE_BYTES[kv_type]
        flags = self.swa_layers or (False,) * len(self.kv_heads)
        return sum(
            heads * (self.key_length + self.value_length)
            for heads, slides in zip(self.kv_heads, flags, strict=False)
            if sliding is None or slides == sliding
        ) * width

    def weight_layout(self) -> tuple[int, tuple[int, ...], int]:
        """(input layer, each repeating layer, output layer) weight bytes: from the GGUF's
        tensors, or, for a model known by file size only, the embedding at the file's mean
        bits per weight for input and output and the rest spread evenly over the layers."""
        if self.layer_bytes:
            return self.input_bytes, self.layer_bytes, self.output_bytes
        bits = self.weight_bytes * 8 / max(1, self.parameters)
        embd = min(int(self.n_vocab * self.n_embd * bits / 8), self.weight_bytes // 2)
        per_layer = max(0, self.weight_bytes - 2 * embd) // max(1, self.n_layer)
        return embd, (per_layer,) * self.n_layer, embd

    def kv_layer_bytes(self, ctx_size: int, parallel: int = 1, kv_type: str = "f16",
                       ubatch: int = UBATCH) -> tuple[int, ...]:
        """Each layer's KV cache bytes at `-c ctx_size -np parallel` (0 for layers without
        attention): what moves to a GPU with the layer (llama-kv-cache.cpp: `dev_layer(il)`)."""
        global_cells, swa_cells = self.kv_cells(ctx_size, parallel, ubatch)
        width = KV_TYPE_BYTES[kv_type]
        flags = self.swa_layers or (False,) * len(self.kv_heads)
        return tuple(
            int(heads * (self.key_length + self.value_length) * width
                * (swa_cells if slides else global_cells))
            for heads, slides in zip(self.kv_heads, flags + (False,) * (len(self.kv_heads) - len(flags)),
                                     strict=True)
        )

    def kv_cells(self, ctx_size: int, parallel: int = 1, ubatch: int = UBATCH) -> tuple[int, int]:
        """KV cache cells (all slots together) of the global and the sliding-window layers, as
        llama-server sizes them with `-c ctx_size -np parallel` (one KV stream per slot):

        global: the padded context; sliding: per slot pad256(min(slot ctx, n_swa + n_ubatch))
        (llama-kv-cache-iswa.cpp; n_ubatch is min(-ub, -b, context))."""
        ctx = padded_ctx(ctx_size)
        per_slot = padded_ctx(max(1, ctx // max(1, parallel)))
        total = per_slot * max(1, parallel)
        if not self.sliding_window:
            return total, 0
        ubatch = min(ubatch, total)
        swa_per_slot = padded_ctx(min(per_slot, self.sliding_window + ubatch))
        return total, swa_per_slot * max(1, parallel)


def swa_layer_flags(n_layer: int, pattern: int | list[Any] | None) -> tuple[bool, ...]:
    """Per layer, whether it uses the sliding window: an explicit per-layer list from the GGUF,
    or llama.cpp's `set_swa_pattern(n)` rule (layer il slides when il % n < n - 1)."""
    if pattern is None:
        return ()
    if isinstance(pattern, list):
        return tuple(bool(flag) for flag in pattern[:n_layer])
    n = int(pattern)
    return tuple(n == 0 or il % n < n - 1 for il in range(n_layer))


def _weight_layout(info: GGUFInfo) -> tuple[int, tuple[int, ...], int, bool]:
    """(input, per layer, output, output tied) bytes from the tensor table."""
    layers = [0] * info.block_count
    input_bytes = output_bytes = 0
    has_output = any(t.name == "output.weight" for t in info.tensors)
    for tensor in info.tensors:
        name = tensor.name
        if name.startswith("blk."):
            index = int(name.split(".", 2)[1])
            if index < len(layers):
                layers[index] += tensor.n_bytes
                continue
        if name.startswith("output"):
            output_bytes += tensor.n_bytes
        else:
            input_bytes += tensor.n_bytes
            if name == "token_embd.weight" and not has_output:
                output_bytes += tensor.n_bytes  # tied: a second copy on the output layer's device
    return input_bytes, tuple(layers), output_bytes, not has_output


def _repackable_bytes(info: GGUFInfo) -> dict[str, int]:
    """Bytes per type of the weights that feed matrix multiplies with rows in groups of 8.

    The token embedding is only looked up (never multiplied) unless it is tied to the
    output, where llama.cpp loads it a second time as the output matrix.
    """
    by_type: dict[str, int] = {}
    has_output = any(t.name == "output.weight" for t in info.tensors)
    for tensor in info.tensors:
        if len(tensor.shape) != 2 or tensor.shape[1] % 8:
            continue
        if tensor.name == "token_embd.weight" and has_output:
            continue
        by_type[tensor.type_name] = by_type.get(tensor.type_name, 0) + tensor.n_bytes
    return by_type


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


def padded_ctx(ctx_size: int) -> int:
    return -(-ctx_size // CTX_PAD) * CTX_PAD


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


# The tensor type most of a file type's matrices use, and the share of the weights they hold
# (measured on llama.cpp's Q4_K_M files of several shapes: 62-72 %).
_MAIN_TYPE = {"Q4_1": "Q4_1", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K",
              "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K", "Q2_K": "Q2_K", "Q6_K": "Q6_K",
              "Q8_0": "Q8_0", "Q4_0": "Q4_0", "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL",
              "F16": "F16", "BF16": "BF16", "F32": "F32"}
MAIN_TYPE_SHARE = 0.7


def approximate_matmul_bytes(file_type: str, weight_bytes: int) -> dict[str, int]:
    """`matmul_bytes_by_type` for a model known only by its file type and size (no file yet)."""
    main = _MAIN_TYPE.get(file_type.upper())
    return {main: int(weight_bytes * MAIN_TYPE_SHARE)} if main else {}
