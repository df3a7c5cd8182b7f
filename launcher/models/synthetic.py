"""Write GGUF models with random weights, a working tokenizer and a chat template.

They load and run in llama-server like real models of the same shape (speed and memory
depend on shape and quantization, not on weight values), so tests, the demo and
`doctor --bench` need no download. Every file says "random weights" in `general.name`
and carries `lalo.synthetic = true`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize

from launcher.errors import UsageError
from launcher.units import format_parameters

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Tensor types the generator writes itself; K-quants come from llama-quantize afterwards.
WRITABLE_TYPES: dict[str, GGMLQuantizationType] = {
    "F32": GGMLQuantizationType.F32,
    "F16": GGMLQuantizationType.F16,
    "Q8_0": GGMLQuantizationType.Q8_0,
    "Q4_0": GGMLQuantizationType.Q4_0,
}
_FILE_TYPES = {
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
}
_SPECIAL = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
_PIECE_CHARS = "etaoinshrdlcumwfgypbvkjxqz"
_WORDS = (
    "the of and to in is that it for was on are as with his they at be this from have or by "
    "one had not but what all were when we there can an your which their said if do will each "
    "about how up out them then she many some so these would other into has more her two like "
    "him see time could no make than first been its who now people my made over did down only "
    "way find use may water long little very after words called just where most know model "
    "local random weights hello world token server llama lalo"
).split()


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide a model's size, speed and memory."""

    architecture: str = "llama"  # llama | lfm2
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 4
    n_ff: int = 128
    n_vocab: int = 1024
    n_ctx_train: int = 4096
    tie_embeddings: bool = True
    # lfm2 only: which layers have attention (the others are short convolutions)
    attention_layers: tuple[int, ...] = field(default_factory=tuple)
    conv_l_cache: int = 3

    def validate(self) -> None:
        if self.architecture not in ("llama", "lfm2"):
            raise UsageError(f"synthetic models support llama and lfm2, not {self.architecture!r}")
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise UsageError("n_embd must divide by n_head, and n_head by n_head_kv")
        if self.n_embd % 32 or self.n_ff % 32:
            raise UsageError("n_embd and n_ff must be multiples of 32")
        if self.n_vocab < 512:
            raise UsageError("n_vocab must be at least 512 (bytes, specials and some pieces)")
        if any(not 0 <= layer < self.n_layer for layer in self.attention_layers):
            raise UsageError("attention_layers must name layers of the model")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def has_attention(self, layer: int) -> bool:
        return self.architecture != "lfm2" or layer in self.attention_layers

    def parameter_count(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in _tensor_shapes(self))


# Shapes of the catalog's real models (from their config.json), for benchmarks and tests.
SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(),
    "demo": ModelShape(n_embd=256, n_layer=4, n_head=4, n_head_kv=4, n_ff=768, n_vocab=8192),
    "llama-350m": ModelShape(
        n_embd=1024, n_layer=24, n_head=16, n_head_kv=16, n_ff=2816, n_vocab=32000
    ),
    "lfm2-350m": ModelShape(
        architecture="lfm2", n_embd=1024, n_layer=16, n_head=16, n_head_kv=8, n_ff=4608,
        n_vocab=65536, n_ctx_train=128000, attention_layers=(2, 5, 8, 10, 12, 14),
    ),
    "lfm2-1.2b": ModelShape(
        architecture="lfm2", n_embd=2048, n_layer=16, n_head=32, n_head_kv=8, n_ff=8192,
        n_vocab=65536, n_ctx_train=128000, attention_layers=(2, 5, 8, 10, 12, 14),
    ),
    "qwen2.5-0.5b": ModelShape(
        n_embd=896, n_layer=24, n_head=14, n_head_kv=2, n_ff=4864, n_vocab=151936,
        n_ctx_train=32768,
    ),
    "tinyllama-1.1b": ModelShape(
        n_embd=2048, n_layer=22, n_head=32, n_head_kv=4, n_ff=5632, n_vocab=32000,
        n_ctx_train=2048, tie_embeddings=False,
    ),
    "phi-2": ModelShape(
        n_embd=2560, n_layer=32, n_head=32, n_head_kv=32, n_ff=10240, n_vocab=51200,
        n_ctx_train=2048, tie_embeddings=False,
    ),
    # Phi-2's MLP has two matrices (fc1, fc2), llama's three: n_ff 6912 (a multiple of 256,
    # so K-quants apply) gives the llama shape phi-2's parameter count and bytes per token.
    "phi-2-equiv": ModelShape(
        n_embd=2560, n_layer=32, n_head=32, n_head_kv=32, n_ff=6912, n_vocab=51200,
        n_ctx_train=2048, tie_embeddings=False,
    ),
}


def _tensor_shapes(shape: ModelShape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor, in file order; numpy order is (rows, row length)."""
    e, ff, v = shape.n_embd, shape.n_ff, shape.n_vocab
    kv = shape.n_head_kv * shape.head_dim
    yield "token_embd.weight", (v, e)
    for layer in range(shape.n_layer):
        p = f"blk.{layer}."
        yield p + "attn_norm.weight", (e,)
        if shape.has_attention(layer):
            if shape.architecture == "lfm2":
                yield p + "attn_q_norm.weight", (shape.head_dim,)
                yield p + "attn_k_norm.weight", (shape.head_dim,)
            yield p + "attn_q.weight", (e, e)
            yield p + "attn_k.weight", (kv, e)
            yield p + "attn_v.weight", (kv, e)
            yield p + "attn_output.weight", (e, e)
        else:
            yield p + "shortconv.conv.weight", (e, shape.conv_l_cache)
            yield p + "shortconv.in_proj.weight", (3 * e, e)
            yield p + "shortconv.out_proj.weight", (e, e)
        yield p + "ffn_norm.weight", (e,)
        yield p + "ffn_gate.weight", (ff, e)
        yield p + "ffn_up.weight", (ff, e)
        yield p + "ffn_down.weight", (e, ff)
    yield ("token_embd_norm.weight" if shape.architecture == "lfm2" else "output_norm.weight"), (e,)
    if not shape.tie_embeddings:
        yield "output.weight", (v, e)


def build_vocab(n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """A SentencePiece-style vocab: specials, 256 byte-fallback tokens, then word pieces.

    llama.cpp tokenizes any UTF-8 text with it (unknown characters fall back to bytes).
    """
    tokens: list[bytes] = [token.encode() for token in _SPECIAL]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, TokenType.CONTROL,
             TokenType.CONTROL]
    tokens += [f"<0x{byte:02X}>".encode() for byte in range(256)]
    types += [TokenType.BYTE] * 256
    seen = set(tokens)

    def pieces() -> Iterator[str]:
        yield "\u2581"
        for char in _PIECE_CHARS + _PIECE_CHARS.upper() + "0123456789.,!?'\"-:;()":
            yield char
            yield "\u2581" + char
        for word in _WORDS:
            yield "\u2581" + word
            yield word
        for first in _PIECE_CHARS:
            for second in _PIECE_CHARS:
                yield first + second
                yield "\u2581" + first + second
        counter = 0
        while True:  # filler pieces to reach the requested size: distinct letter strings
            counter += 1
            text, value = "", counter
            while value:
                value, rest = divmod(value, 26)
                text += _PIECE_CHARS[rest]
            yield "\u2581" + text + "x"

    generator = pieces()
    while len(tokens) < n_vocab:
        piece = next(generator).encode()
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(TokenType.NORMAL)
    scores = [0.0] * len(_SPECIAL) + [0.0] * 256
    scores += [-float(rank) for rank in range(len(tokens) - len(scores))]
    return tokens, scores, [int(t) for t in types]


def write_synthetic_model(
    path: str | Path,
    shape: ModelShape = ModelShape(),
    *,
    tensor_type: str = "F16",
    seed: int = 0,
    name: str | None = None,
) -> Path:
    """Write a random-weight GGUF of `shape` to `path` (atomically) and return the path."""
    shape.validate()
    if tensor_type not in WRITABLE_TYPES:
        raise UsageError(f"tensor type must be one of {', '.join(WRITABLE_TYPES)}, got {tensor_type!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arch = shape.architecture
    fd, tmp_name = tempfile.mkstemp(prefix=".synthetic-", suffix=".gguf.part", dir=path.parent)
    os.close(fd)
    try:
        writer = GGUFWriter(tmp_name, arch)
        params = shape.parameter_count()
        label = name or f"lalo synthetic {arch} {format_parameters(params)} (random weights)"
        if "random weights" not in label:
            label += " (random weights)"
        writer.add_name(label)
        writer.add_description("Random weights made by lalo for testing; it produces noise, not text.")
        writer.add_bool("lalo.synthetic", True)
        writer.add_string("lalo.shape", repr(asdict(shape)))
        writer.add_file_type(int(_FILE_TYPES[tensor_type]))
        writer.add_context_length(shape.n_ctx_train)
        writer.add_embedding_length(shape.n_embd)
        writer.add_block_count(shape.n_layer)
        writer.add_feed_forward_length(shape.n_ff)
        writer.add_head_count(shape.n_head)
        if arch == "lfm2":
            writer.add_head_count_kv(
                [shape.n_head_kv if shape.has_attention(i) else 0 for i in range(shape.n_layer)]
            )
            writer.add_uint32(f"{arch}.shortconv.l_cache", shape.conv_l_cache)
            writer.add_vocab_size(shape.n_vocab)
        else:
            writer.add_head_count_kv(shape.n_head_kv)
            writer.add_rope_dimension_count(shape.head_dim)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_freq_base(10000.0)

        tokens, scores, types = build_vocab(shape.n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_uint32("tokenizer.ggml.eot_token_id", 4)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_chat_template(CHATML_TEMPLATE)

        qtype = WRITABLE_TYPES[tensor_type]
        for tensor_name, tensor_shape in _tensor_shapes(shape):
            dtype, n_bytes, raw_shape = _encoded_layout(tensor_shape, qtype)
            raw_dtype = _tensor_qtype(tensor_shape, qtype) if dtype == np.uint8 else None
            writer.add_tensor_info(tensor_name, raw_shape, dtype, n_bytes, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _tensor_name, tensor_shape in _tensor_shapes(shape):
            writer.write_tensor_data(_random_tensor(rng, tensor_shape, qtype))
        writer.close()
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _tensor_qtype(tensor_shape: tuple[int, ...], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """Norms and vectors stay F32 (as llama.cpp's converters do); matrices take `qtype`."""
    return qtype if len(tensor_shape) == 2 and tensor_shape[-1] % 32 == 0 else GGMLQuantizationType.F32


def _encoded_layout(
    tensor_shape: tuple[int, ...], qtype: GGMLQuantizationType
) -> tuple[np.dtype[np.generic], int, tuple[int, ...]]:
    kind = _tensor_qtype(tensor_shape, qtype)
    elements = int(np.prod(tensor_shape))
    if kind == GGMLQuantizationType.F32:
        return np.dtype(np.float32), elements * 4, tensor_shape
    if kind == GGMLQuantizationType.F16:
        return np.dtype(np.float16), elements * 2, tensor_shape
    from gguf.constants import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[kind]
    row_bytes = tensor_shape[-1] // block * type_size
    byte_shape = (*tensor_shape[:-1], row_bytes)
    return np.dtype(np.uint8), int(np.prod(byte_shape)), byte_shape


def _random_tensor(
    rng: np.random.Generator, tensor_shape: tuple[int, ...], qtype: GGMLQuantizationType
) -> np.ndarray:
    kind = _tensor_qtype(tensor_shape, qtype)
    if len(tensor_shape) == 1:
        return np.ones(tensor_shape, dtype=np.float32)  # norm weights: identity scale
    values = rng.standard_normal(tensor_shape, dtype=np.float32)
    values *= 0.02
    if kind == GGMLQuantizationType.F32:
        return values
    if kind == GGMLQuantizationType.F16:
        return values.astype(np.float16)
    return quantize(values, kind)


def shape_named(name: str, **overrides: Any) -> ModelShape:
    try:
        base = SHAPES[name]
    except KeyError:
        raise UsageError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}") from None
    return replace(base, **overrides) if overrides else base
