"""Read a GGUF file's header and tensor index (never its weights) into `GGUFInfo`.

Memory-maps the file and parses only the metadata, so it is instant on multi-GB files;
anything that is not a well-formed GGUF raises GGUFError with one clear line.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import GGUFError
from launcher.models.ggml_types import FILE_TYPES, TENSOR_TYPES

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4
_MAX_COUNT = 10_000_000

# GGUF metadata value types
_SCALARS: dict[int, str] = {
    0: "<B",  # uint8
    1: "<b",  # int8
    2: "<H",  # uint16
    3: "<h",  # int16
    4: "<I",  # uint32
    5: "<i",  # int32
    6: "<f",  # float32
    7: "<?",  # bool
    10: "<Q",  # uint64
    11: "<q",  # int64
    12: "<d",  # float64
}
_STRING = 8
_ARRAY = 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    n_bytes: int

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def type_name(self) -> str:
        known = TENSOR_TYPES.get(self.ggml_type)
        return known[0] if known else f"type{self.ggml_type}"


@dataclass(frozen=True)
class GGUFInfo:
    """What lalo needs to know about a model file, read from its header."""

    path: Path
    file_size: int
    version: int
    metadata: Mapping[str, Any]
    array_lengths: Mapping[str, int]
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    data_offset: int = 0

    # --- generic facts -------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def name(self) -> str | None:
        value = self.metadata.get("general.name")
        return str(value) if value is not None else None

    @property
    def parameter_count(self) -> int:
        return sum(tensor.n_elements for tensor in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(tensor.n_bytes for tensor in self.tensors)

    @property
    def file_type(self) -> str:
        """Quantization name as llama.cpp reports it (Q4_K_M, F16, ...)."""
        value = self.metadata.get("general.file_type")
        if isinstance(value, int):
            return FILE_TYPES.get(value, f"type{value}")
        return self.dominant_tensor_type

    @property
    def dominant_tensor_type(self) -> str:
        by_type: dict[str, int] = {}
        for tensor in self.tensors:
            if len(tensor.shape) >= 2:
                by_type[tensor.type_name] = by_type.get(tensor.type_name, 0) + tensor.n_bytes
        return max(by_type, key=lambda key: by_type[key]) if by_type else "unknown"

    @property
    def bits_per_weight(self) -> float:
        params = self.parameter_count
        return self.tensor_bytes * 8 / params if params else 0.0

    # --- architecture facts (llama.cpp's `{arch}.*` keys) ----------------------------------
    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def block_count(self) -> int:
        return int(self.arch_value("block_count", 0))

    @property
    def embedding_length(self) -> int:
        return int(self.arch_value("embedding_length", 0))

    @property
    def feed_forward_length(self) -> int:
        value = self.arch_value("feed_forward_length", 0)
        return int(max(value) if isinstance(value, list) and value else value or 0)

    @property
    def context_length(self) -> int:
        return int(self.arch_value("context_length", 0))

    @property
    def head_count(self) -> int:
        value = self.arch_value("attention.head_count", 0)
        return int(max(value) if isinstance(value, list) and value else value or 0)

    def head_count_kv_per_layer(self) -> list[int]:
        """KV heads of each layer; 0 for layers without attention (recurrent/conv layers)."""
        value = self.arch_value("attention.head_count_kv")
        if isinstance(value, list):
            return [int(v) for v in value][: self.block_count] or [0] * self.block_count
        heads = int(value) if value is not None else self.head_count
        return [heads] * self.block_count

    @property
    def head_count_kv(self) -> int:
        per_layer = [heads for heads in self.head_count_kv_per_layer() if heads]
        return max(per_layer) if per_layer else 0

    @property
    def key_length(self) -> int:
        default = self.embedding_length // self.head_count if self.head_count else 0
        return int(self.arch_value("attention.key_length", default))

    @property
    def value_length(self) -> int:
        default = self.embedding_length // self.head_count if self.head_count else 0
        return int(self.arch_value("attention.value_length", default))

    @property
    def vocab_size(self) -> int:
        tokens = self.array_lengths.get("tokenizer.ggml.tokens")
        if tokens:
            return tokens
        value = self.arch_value("vocab_size")
        if value:
            return int(value)
        for tensor in self.tensors:
            if tensor.name == "token_embd.weight" and len(tensor.shape) == 2:
                return tensor.shape[1]
        return 0

    @property
    def has_chat_template(self) -> bool:
        return bool(self.metadata.get("tokenizer.chat_template"))

    @property
    def is_synthetic(self) -> bool:
        return bool(self.metadata.get("lalo.synthetic", False))

    def summary(self) -> dict[str, Any]:
        """The facts `lalo inspect` prints, as plain JSON-able values."""
        return {
            "path": str(self.path),
            "file_size": self.file_size,
            "gguf_version": self.version,
            "architecture": self.architecture,
            "name": self.name,
            "parameters": self.parameter_count,
            "file_type": self.file_type,
            "bits_per_weight": round(self.bits_per_weight, 2),
            "layers": self.block_count,
            "embedding_length": self.embedding_length,
            "feed_forward_length": self.feed_forward_length,
            "heads": self.head_count,
            "kv_heads": self.head_count_kv,
            "attention_layers": sum(1 for heads in self.head_count_kv_per_layer() if heads),
            "context_length": self.context_length,
            "vocab_size": self.vocab_size,
            "chat_template": self.has_chat_template,
            "tensors": len(self.tensors),
            "tensor_bytes": self.tensor_bytes,
            "synthetic": self.is_synthetic,
            "license": self.metadata.get("general.license"),
        }


_U64 = struct.Struct("<Q")


class _Cursor:
    """Bounds-checked little-endian reads over a buffer; running off the end means truncated."""

    def __init__(self, buffer: mmap.mmap | bytes, path: Path) -> None:
        self.buffer = buffer
        self.pos = 0
        self.path = path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buffer):
            raise GGUFError(f"{self.path}: truncated GGUF header (ends at byte {len(self.buffer)})")
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if self.pos + length > len(self.buffer):
            raise GGUFError(f"{self.path}: truncated GGUF header (a string runs past the end)")
        raw = self.buffer[self.pos : self.pos + length]
        self.pos += length
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(raw).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        """Step over `count` strings in one tight loop: a vocabulary and its merges can hold
        hundreds of thousands, and this is on `lalo up`'s path before any server starts."""
        buffer, pos, end = self.buffer, self.pos, len(self.buffer)
        length_at = _U64.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise GGUFError(f"{self.path}: truncated GGUF header (ends at byte {end})")
            pos += 8 + length_at(buffer, pos)[0]
        if pos > end:
            raise GGUFError(f"{self.path}: truncated GGUF header (a string runs past the end)")
        self.pos = pos


def read_gguf(path: str | Path) -> GGUFInfo:
    """Parse the header of `path`; raises GGUFError for anything that is not a sound GGUF."""
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise GGUFError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GGUFError(f"{path}: is a directory, not a GGUF file") from None
    except OSError as exc:
        raise GGUFError(f"{path}: cannot open: {exc.strerror}") from None
    with handle:
        size = path.stat().st_size
        if size < 24:
            raise GGUFError(f"{path}: not a GGUF file ({size} bytes)")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            return _parse(buffer, path, size)


def _parse(buffer: mmap.mmap, path: Path, size: int) -> GGUFInfo:
    if buffer[:4] != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {bytes(buffer[:4])!r})")
    cursor = _Cursor(buffer, path)
    cursor.pos = 4
    version = cursor.take("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version} (lalo reads 2 and 3)")
    n_tensors = cursor.take("<Q")
    n_kv = cursor.take("<Q")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise GGUFError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")

    metadata: dict[str, Any] = {}
    array_lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = cursor.string()
        value_type = cursor.take("<I")
        if value_type == _ARRAY:
            item_type = cursor.take("<I")
            count = cursor.take("<Q")
            array_lengths[key] = count
            metadata[key] = _read_array(cursor, key, item_type, count)
        else:
            metadata[key] = _read_value(cursor, key, value_type)

    tensors: list[TensorInfo] = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.take("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise GGUFError(f"{path}: corrupt tensor {name!r} ({n_dims} dimensions)")
        shape = tuple(cursor.take("<Q") for _ in range(n_dims))
        ggml_type = cursor.take("<I")
        offset = cursor.take("<Q")
        n_bytes = _tensor_bytes(path, name, shape, ggml_type)
        tensors.append(TensorInfo(name, shape, ggml_type, offset, n_bytes))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: corrupt GGUF header (alignment {alignment!r})")
    data_offset = -(-cursor.pos // alignment) * alignment
    for tensor in tensors:
        end = data_offset + tensor.offset + tensor.n_bytes
        if tensor.offset % alignment:
            raise GGUFError(f"{path}: corrupt tensor index ({tensor.name} is not aligned)")
        if end > size:
            raise GGUFError(
                f"{path}: truncated GGUF file: tensor {tensor.name} needs bytes up to {end}, "
                f"the file has {size}"
            )
    return GGUFInfo(
        path=path,
        file_size=size,
        version=version,
        metadata=metadata,
        array_lengths=array_lengths,
        tensors=tuple(tensors),
        data_offset=data_offset,
    )


def _read_value(cursor: _Cursor, key: str, value_type: int) -> Any:
    if value_type == _STRING:
        return cursor.string()
    fmt = _SCALARS.get(value_type)
    if fmt is None:
        raise GGUFError(f"{cursor.path}: corrupt GGUF metadata ({key!r} has type {value_type})")
    return cursor.take(fmt)


_KEEP_ARRAY = 4096  # arrays longer than this (token lists, merges) are skipped, only counted


def _read_array(cursor: _Cursor, key: str, item_type: int, count: int) -> Any:
    if count > _MAX_COUNT * 10:
        raise GGUFError(f"{cursor.path}: corrupt GGUF metadata ({key!r} has {count} items)")
    keep = count <= _KEEP_ARRAY
    if item_type == _STRING:
        if keep:
            return [cursor.string() for _ in range(count)]
        cursor.skip_strings(count)
        return None
    if item_type == _ARRAY:
        raise GGUFError(f"{cursor.path}: nested arrays are not supported ({key!r})")
    fmt = _SCALARS.get(item_type)
    if fmt is None:
        raise GGUFError(f"{cursor.path}: corrupt GGUF metadata ({key!r} has item type {item_type})")
    width = struct.calcsize(fmt)
    end = cursor.pos + width * count
    if end > len(cursor.buffer):
        raise GGUFError(f"{cursor.path}: truncated GGUF header (array {key!r} runs past the end)")
    if not keep:
        cursor.pos = end
        return None
    values = list(struct.unpack_from(f"<{count}{fmt[1]}", cursor.buffer, cursor.pos))
    cursor.pos = end
    return values


def _tensor_bytes(path: Path, name: str, shape: tuple[int, ...], ggml_type: int) -> int:
    known = TENSOR_TYPES.get(ggml_type)
    if known is None:
        raise GGUFError(f"{path}: tensor {name!r} has unknown type {ggml_type}")
    _, block, type_size = known
    elements = 1
    for dim in shape:
        elements *= dim
    if shape[0] % block:
        raise GGUFError(f"{path}: corrupt tensor {name!r} (row of {shape[0]} not a multiple of {block})")
    return elements // block * type_size
