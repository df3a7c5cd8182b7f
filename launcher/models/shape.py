"""What a model is, for memory: its architecture facts (`ModelFacts`, from a GGUF header or a
catalog entry) and the llama.cpp layout rules that size its KV cache.

The estimate (`launcher.placement.estimate`) turns these into bytes; the catalog and the GGUF
reader produce them. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from launcher.config.server_args import DEFAULT_CHECKPOINTS, DEFAULT_UBATCH
from launcher.models.gguf_file import GGUFInfo

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


def padded_ctx(ctx_size: int) -> int:
    return -(-ctx_size // CTX_PAD) * CTX_PAD


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
