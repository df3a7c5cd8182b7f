"""Write llamafiles (runtime + page-aligned stored GGUF + `.args` + ZIP64 directory),
byte for byte as ../shared/LLAMAFILE.md describes, without the zipalign tool.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import BinaryIO

from launcher.errors import PackagingError
from launcher.packaging.atomic import atomic_output
from launcher.packaging.formats import zip64
from launcher.packaging.formats.zip64 import ZipEntry

DEFAULT_ALIGNMENT = 65536
# 0.10 is the maintained line (mozilla-ai/llamafile); it opens `-m` as a path, so the model
# must be named through the runtime's /zip/ file system. 0.9.x wants the bare entry name.
DEFAULT_RUNTIME_VERSION = "0.10"
WINDOWS_MAX_SIZE = 4 * 1024**3
ARGS_ENTRY = ".args"
MODEL_SUFFIX = ".gguf"
USER_ARGS_MARKER = "..."

_CHUNK_SIZE = 8 * 1024 * 1024
_UNSAFE_CHARS = frozenset("'\"$\\")
_VERSION = re.compile(r"^(\d+)\.(\d+)")

Progress = Callable[[int, int], None]
"""Called as progress(bytes_written, bytes_total) while copying the runtime and inputs."""


@dataclass(frozen=True)
class LlamafileResult:
    """What write_llamafile wrote: the new directory's entries, in order, and its warnings."""

    path: Path
    size: int
    entries: tuple[ZipEntry, ...]
    model_entry: ZipEntry
    args: tuple[str, ...]
    """The tokens written to `.args` before the trailing `...`."""
    warnings: tuple[str, ...]


# --- .args ---------------------------------------------------------------------------------


def model_arg(entry_name: str, runtime_version: str = DEFAULT_RUNTIME_VERSION) -> str:
    """The `-m` value that names an entry of the llamafile for that runtime version."""
    match = _VERSION.match(runtime_version)
    if match is None:
        raise PackagingError(f"runtime version must look like 0.10 or 0.9.3: {runtime_version!r}")
    if (int(match[1]), int(match[2])) < (0, 10):
        return entry_name
    return f"/zip/{entry_name}"


def build_args(
    model_entry_name: str,
    extra_args: Sequence[str] = (),
    *,
    runtime_version: str = DEFAULT_RUNTIME_VERSION,
) -> str:
    """`.args` text: `-m`, the model, the extra args, `...`, one per line.

    Tokens the runtime would re-split, unquote, expand or take for a comment are rejected
    rather than quoted, so the file reads the same in every runtime version.
    """
    return _format_args(_args_tokens(model_entry_name, extra_args, runtime_version))


def _format_args(tokens: Sequence[str]) -> str:
    return "\n".join([*tokens, USER_ARGS_MARKER]) + "\n"


def _args_tokens(entry_name: str, extra_args: Sequence[str], runtime_version: str) -> list[str]:
    tokens = ["-m", model_arg(entry_name, runtime_version), *extra_args]
    for token in tokens:
        _check_token(token)
    return tokens


def _check_token(token: str) -> None:
    if not token:
        raise PackagingError(".args: empty argument (the runtime would drop it)")
    if token == USER_ARGS_MARKER:
        raise PackagingError(f".args: argument {token!r} is the runtime's user-argument marker")
    if token.startswith("#"):
        raise PackagingError(f".args: argument {token!r} starts with '#' (a comment)")
    if any(c.isspace() or c in _UNSAFE_CHARS for c in token):
        raise PackagingError(
            f".args: argument {token!r} contains whitespace, a quote, '$' or '\\'"
        )


def windows_warnings(size: int, out_name: str) -> tuple[str, ...]:
    """Why a llamafile of this size and name will not start on Windows, if it will not."""
    warnings = []
    if size >= WINDOWS_MAX_SIZE:
        warnings.append(
            f"{out_name} is {size} bytes; Windows will not run executables of 4 GiB or more: "
            "ship the runtime and the .gguf separately and pass -m"
        )
    if not out_name.lower().endswith(".exe"):
        warnings.append(f"{out_name}: Windows only runs it under a name ending in .exe")
    return tuple(warnings)


def write_llamafile(
    runtime: Path,
    model: Path,
    out: Path,
    *,
    args: Sequence[str] = (),
    alignment: int = DEFAULT_ALIGNMENT,
    progress: Progress | None = None,
    windows_target: bool = False,
    runtime_version: str = DEFAULT_RUNTIME_VERSION,
    entry_name: str | None = None,
) -> LlamafileResult:
    """Write `out` = runtime + `<model>.gguf` (stored, data aligned) + `.args` + directory.

    The entry name defaults to the model's file name (with `.gguf` added if missing); the
    model is streamed, never parsed or held in memory. `out` appears whole or not at all.
    """
    name = entry_name if entry_name is not None else _default_entry_name(model)
    _check_entry_name(name)
    text = build_args(name, args, runtime_version=runtime_version)
    tokens = text.splitlines()[:-1]  # before the trailing `...`
    entries = append_aligned(
        runtime,
        [(name, model), (ARGS_ENTRY, text.encode())],
        out,
        alignment=alignment,
        progress=progress,
    )
    size = out.stat().st_size
    return LlamafileResult(
        path=out,
        size=size,
        entries=entries,
        model_entry=next(e for e in entries if e.name == name),
        args=tuple(tokens),
        warnings=windows_warnings(size, out.name) if windows_target else (),
    )


def _default_entry_name(model: Path) -> str:
    return model.name if model.name.endswith(MODEL_SUFFIX) else model.name + MODEL_SUFFIX


def _check_entry_name(name: str) -> None:
    if not name.endswith(MODEL_SUFFIX) or name == MODEL_SUFFIX:
        raise PackagingError(f"model entry name {name!r} must end in {MODEL_SUFFIX}")
    if "@" in name:
        # The runtime reads `a@b` as "entry b of zip a"; pass entry_name= to rename it.
        raise PackagingError(f"model entry name {name!r} contains '@', which the runtime misreads")
    if "/" in name or "\\" in name:
        raise PackagingError(f"model entry name {name!r} must not contain a path separator")


def append_aligned(
    runtime: Path,
    inputs: Sequence[tuple[str, Path | bytes]],
    out: Path,
    *,
    alignment: int = DEFAULT_ALIGNMENT,
    progress: Progress | None = None,
) -> tuple[ZipEntry, ...]:
    """zipalign, done right: copy `runtime` to `out` and append each (name, file or bytes) as a
    stored entry whose data starts on a multiple of `alignment`, then a ZIP64 directory.

    The runtime's own zip entries stay in order at their offsets, except those an input
    replaces. Returns the entries of the new directory. Writes a temp file beside `out`
    and renames it into place, so an interrupted write leaves no `out`.
    """
    if alignment < 1 or alignment & (alignment - 1):
        raise PackagingError(f"alignment must be a power of two, got {alignment}")
    names = [name for name, _ in inputs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise PackagingError(f"two inputs named {duplicates[0]!r}")
    sources = [source for _, source in inputs if isinstance(source, Path)]
    if any(out.resolve() == path.resolve() for path in [runtime, *sources]):
        raise PackagingError(f"{out}: output would overwrite one of its own inputs")
    try:
        runtime_file = runtime.open("rb")
    except OSError as exc:
        raise PackagingError(f"cannot read runtime: {exc}") from exc
    with runtime_file:
        runtime_stat = os.fstat(runtime_file.fileno())
        kept = _kept_runtime_entries(runtime_file, runtime_stat.st_size, runtime, names)
        try:
            total = runtime_stat.st_size + sum(_input_size(source) for _, source in inputs)
        except OSError as exc:
            raise PackagingError(f"cannot read input: {exc}") from exc
        mode = stat.S_IMODE(runtime_stat.st_mode) | 0o755
        with atomic_output(out, mode, fsync=True) as dest:
            copier = _Copier(dest, total, progress)
            runtime_file.seek(0)
            copier.copy(runtime_file, runtime_stat.st_size, runtime)
            new = [_append_entry(copier, name, source, alignment) for name, source in inputs]
            _write_directory(dest, [*kept, *new])
    return (*kept, *new)


def _input_size(source: Path | bytes) -> int:
    return len(source) if isinstance(source, bytes) else source.stat().st_size


def _kept_runtime_entries(
    f: BinaryIO, size: int, runtime: Path, replaced: Sequence[str]
) -> list[ZipEntry]:
    entries = zip64.read_central_directory(f, size, runtime) or ()
    kept = [e for e in entries if e.name not in replaced]
    models = [e.name for e in kept if e.name.endswith(MODEL_SUFFIX)]
    if models and any(name.endswith(MODEL_SUFFIX) for name in replaced):
        # A second model would break "exactly one .gguf", and the runtime would pick one.
        raise PackagingError(f"{runtime}: runtime already holds a model entry: {models[0]}")
    return kept


class _Copier:
    """Streams bytes into the output, keeping the CRC of the current entry and the progress."""

    def __init__(self, dest: BinaryIO, total: int, progress: Progress | None) -> None:
        self.dest = dest
        self.total = total
        self.done = 0
        self.progress = progress
        self.buffer = bytearray(_CHUNK_SIZE)

    def copy(self, src: BufferedReader, size: int, source: Path) -> int:
        """Copy exactly `size` bytes of `src` from its current position; return their CRC-32.

        Holes in a sparse `src` stay holes in the output (the CRC counts their zeros), so a
        sparse model costs no disk twice; where the file system cannot tell, all is data.
        """
        crc = 0
        position = src.tell()
        end = position + size
        while position < end:
            data = position if _SEEK_DATA is None else _next_offset(src, position, _SEEK_DATA, end)
            if data == end and os.fstat(src.fileno()).st_size < end:
                data = position  # no data left because the file shrank: reading says so
            if data > position:
                crc = _zeros_crc(crc, data - position)
                self.dest.seek(data - position, os.SEEK_CUR)
                self.advance(data - position)
                position = data
            if position == end:
                break
            hole = end if _SEEK_HOLE is None else _next_offset(src, position, _SEEK_HOLE, end)
            if hole <= position:
                hole = end
            src.seek(position)
            crc = self._copy_data(src, hole - position, crc, source)
            position = hole
        src.seek(end)
        if src.read(1):
            raise PackagingError(f"{source}: file grew while being copied")
        if os.fstat(src.fileno()).st_size < end:
            raise PackagingError(f"{source}: file shrank while being copied")
        return crc

    def _copy_data(self, src: BufferedReader, size: int, crc: int, source: Path) -> int:
        view = memoryview(self.buffer)
        left = size
        while left:
            got = src.readinto(view[: min(left, _CHUNK_SIZE)])
            if not got:
                raise PackagingError(f"{source}: file shrank while being copied")
            crc = zlib.crc32(view[:got], crc)
            self.dest.write(view[:got])
            left -= got
            self.advance(got)
        return crc

    def advance(self, count: int) -> None:
        self.done += count
        if self.progress is not None:
            self.progress(self.done, self.total)


_SEEK_DATA: int | None = getattr(os, "SEEK_DATA", None)  # Linux, macOS; not Windows
_SEEK_HOLE: int | None = getattr(os, "SEEK_HOLE", None)
_ZEROS = bytes(_CHUNK_SIZE)


def _next_offset(src: BufferedReader, position: int, whence: int, end: int) -> int:
    """Where the next data (SEEK_DATA) or hole (SEEK_HOLE) starts at or after `position`, at
    most `end`; where the file system cannot tell, all is data. The file's offset is put back
    (the buffered reader keeps its own idea of it)."""
    fd = src.fileno()
    saved = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        return min(os.lseek(fd, position, whence), end)
    except OSError as exc:
        if exc.errno == errno.ENXIO and whence == _SEEK_DATA:
            return end  # only a hole from here to the end
        return position if whence == _SEEK_DATA else end
    finally:
        os.lseek(fd, saved, os.SEEK_SET)


def _zeros_crc(crc: int, count: int) -> int:
    while count:
        step = min(count, _CHUNK_SIZE)
        crc = zlib.crc32(_ZEROS[:step], crc) if step < _CHUNK_SIZE else zlib.crc32(_ZEROS, crc)
        count -= step
    return crc


def _append_entry(copier: _Copier, name: str, source: Path | bytes, alignment: int) -> ZipEntry:
    dest = copier.dest
    raw_name = name.encode()
    dest.write(bytes(zip64.padding_before(dest.tell(), len(raw_name), alignment)))
    header_offset = dest.tell()
    if isinstance(source, bytes):
        size, crc = len(source), zlib.crc32(source)
        dest.write(zip64.local_header(raw_name, size, crc))
        data_offset = dest.tell()
        dest.write(source)
        copier.advance(size)
    else:
        # One pass over the model: write the header with CRC 0, stream the data while
        # computing the CRC, then patch 4 bytes. Reading multi-GB weights twice would double
        # the slowest part of packaging; the output is our own seekable temp file.
        with source.open("rb") as src:
            size = os.fstat(src.fileno()).st_size
            dest.write(zip64.local_header(raw_name, size, 0))
            data_offset = dest.tell()
            crc = copier.copy(src, size, source)
        end = dest.tell()
        dest.seek(header_offset + zip64.CRC_OFFSET)
        dest.write(crc.to_bytes(4, "little"))
        dest.seek(end)
    return ZipEntry(
        name=name,
        header_offset=header_offset,
        data_offset=data_offset,
        size=size,
        compressed_size=size,
        crc=crc,
        method=zip64.METHOD_STORED,
        central_record=zip64.central_record(raw_name, size, crc, header_offset),
    )


def _write_directory(dest: BinaryIO, entries: Sequence[ZipEntry]) -> None:
    cd_offset = dest.tell()
    directory = b"".join(entry.central_record for entry in entries)
    dest.write(directory)
    dest.write(zip64.end_records(cd_offset, len(directory), len(entries)))
