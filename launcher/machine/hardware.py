"""This machine's CPU (model, cores, SIMD features), and GPUs as nvidia-smi names them.

Used by `lalo doctor` and by the memory estimate (which weights llama.cpp repacks depends
on the CPU's features).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

# CPU features that decide which llama.cpp kernels run (x86 SIMD, ARM NEON/dot product).
FEATURES = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "neon",
    "dotprod",
    "i8mm",
    "sve",
)


@dataclass(frozen=True)
class CpuInfo:
    model: str
    machine: str
    physical_cores: int
    logical_cores: int
    features: tuple[str, ...]


@functools.cache
def cpu_info() -> CpuInfo:
    machine = platform.machine().lower()
    model, flags = _cpu_model_and_flags(machine)
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    return CpuInfo(
        model=model,
        machine=machine,
        physical_cores=physical,
        logical_cores=logical,
        features=tuple(name for name in FEATURES if name in flags),
    )


def _cpu_model_and_flags(machine: str) -> tuple[str, set[str]]:
    """CPU name and feature flags: /proc/cpuinfo on Linux, sysctl on macOS, else what the
    architecture guarantees (64-bit ARM always has NEON)."""
    flags: set[str] = set()
    model = ""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and value.strip():
                    model = value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
        flags |= {"dotprod"} if "asimddp" in flags else set()
        flags |= {"neon"} if "asimd" in flags else set()
    elif sys.platform == "darwin":
        model = _sysctl("machdep.cpu.brand_string") or ""
        text = " ".join(
            _sysctl(key) or "" for key in ("machdep.cpu.features", "machdep.cpu.leaf7_features")
        ).lower()
        flags.update(word.replace(".", "_") for word in text.split())
        flags |= {"avx2"} if "avx2" in flags else set()
        if machine in ("arm64", "aarch64"):
            flags.add("neon")
            if _sysctl("hw.optional.arm.FEAT_DotProd") == "1":
                flags.add("dotprod")
            if _sysctl("hw.optional.arm.FEAT_I8MM") == "1":
                flags.add("i8mm")
    elif machine in ("arm64", "aarch64"):
        flags.add("neon")
    # platform.processor() runs `uname -p` on Linux: only when nothing better was found
    return model or platform.processor() or machine, flags


def _sysctl(key: str) -> str | None:
    try:
        done = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
