"""Byte sizes (parsed from and formatted for humans at the edges; bytes everywhere else) and
parameter counts as people write them (135M, 7.6B)."""

from __future__ import annotations

import re
from typing import Any

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """'6GiB' -> 6442450944; '512MB' -> 512000000; plain integers are bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return text
    match = _SIZE.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MiB, 6GiB or a number of bytes)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def size_field(value: Any) -> int:
    """A size from a YAML value (an integer of bytes or a string such as "6GiB"), for
    validators: anything else is a ValueError saying what a size looks like."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be a size such as 512MiB or 6GiB, got {value!r}")
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


def auto_or_size_field(value: Any) -> int | str:
    """"auto", or a positive size (see size_field), for validators of budget-like keys."""
    if value == "auto":
        return "auto"
    size = size_field(value)
    if size <= 0:
        raise ValueError(f"must be 'auto' or a positive size, got {value!r}")
    return size


def format_size(n: int | float | None) -> str:
    """Binary units, three significant figures: 1.5 GiB, 232 MiB, 900 B."""
    if n is None:
        return "-"
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            if unit == "B":
                return f"{sign}{int(value)} B"
            digits = 0 if value >= 100 else 1 if value >= 10 else 2
            return f"{sign}{value:.{digits}f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_parameters(count: int) -> str:
    """A model's parameter count as model names and Ollama's `parameter_size` write it:
    135M, 7.6B."""
    if count >= 1e9:
        return f"{count / 1e9:.1f}B"
    if count >= 1e6:
        return f"{count / 1e6:.0f}M"
    return f"{count / 1e3:.0f}K"
