"""Building inside the old-glibc root (launcher/engines/buildroot.py): the root's cmake and gcc,
commands run through chroot, the llama.cpp tree copied in without the CPU variants the root's
gcc cannot build, and the GCC runtime libraries the engine carries from it."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from launcher.engines import source as sources
from launcher.engines.buildroot import BuildRoot
from launcher.engines.cmake import CommandRunner
from launcher.errors import EngineError

# The portable Linux engine is compiled in a Debian 11 root (glibc 2.31, gcc 10) and carries
# the GCC runtime it links (OpenMP, C++), found beside it through rpath $ORIGIN: a client
# needs nothing but glibc >= the root's.
CARRIED_LIBRARIES = ("libgomp.so.1", "libstdc++.so.6", "libgcc_s.so.1")
_LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib64", "usr/lib")
ROOT_SOURCE = "/lalo/src"
ROOT_BUILD = "/lalo/build"
# CPU variants whose instructions (AVX-VNNI, AMX) an older GCC cannot emit: left out of the
# root's copy of the source (llama-server depends on every variant defined, so they cannot be
# skipped at build time); a CPU that has them runs the next best variant (icelake, zen4).
_VARIANT_MIN_GCC = {"alderlake": 11, "sapphirerapids": 11}
_VARIANT_LIST = "ggml/src/CMakeLists.txt"
_LEFT_OUT = "# lalo: left out, gcc < 11: "
_GCC_MAJOR = re.compile(r"\)\s+(\d+)\.\d+")


def gcc_major(version: str) -> int | None:
    """12 from `gcc (Debian 12.2.0-14) 12.2.0`; None for another compiler or format."""
    match = _GCC_MAJOR.search(version) if "gcc" in version.lower() else None
    return int(match.group(1)) if match else None


def unbuildable_variants(compiler: str) -> list[str]:
    """The CPU variants (`alderlake`) that `compiler` (its --version line) cannot build."""
    major = gcc_major(compiler)
    return sorted(name for name, least in _VARIANT_MIN_GCC.items()
                  if major is not None and major < least)


def leave_out_variants(cmake_lists: str, names: Sequence[str]) -> str:
    """ggml's variant list with the `ggml_add_cpu_backend_variant(NAME ...)` lines for `names`
    commented out (idempotent)."""
    if not names:
        return cmake_lists
    pattern = re.compile(r"^(\s*)(ggml_add_cpu_backend_variant\((?:"
                         + "|".join(re.escape(n) for n in names) + r")\s.*)$", re.MULTILINE)
    return pattern.sub(lambda m: f"{m.group(1)}{_LEFT_OUT}{m.group(2)}", cmake_lists)


def root_tools(root: BuildRoot) -> dict[str, str]:
    """cmake and gcc as seen inside the root; EngineError when the root lacks them."""
    tools = {"cmake": "/usr/bin/cmake", "cc": "/usr/bin/gcc", "c++": "/usr/bin/g++"}
    for path in tools.values():
        if not root.host_path(path).exists():
            raise EngineError(f"build root {root.path} has no {path}; remove it to remake it")
    return tools


def in_root(runner: CommandRunner, root: BuildRoot) -> CommandRunner:
    def run(argv: Sequence[str], *, cwd: Path, on_line: Callable[[str], None]) -> int:
        return runner(root.chroot_argv(argv), cwd=cwd, on_line=on_line)

    return run


def copy_source_into(tree: Path, target: Path, left_out: Sequence[str], commit: str) -> None:
    """The llama.cpp tree copied into the root once per commit (complete, or not there), with
    the CPU variants the root's compiler cannot build left out of it, and the commit written
    into its build info (the root has no git, so `--version` would say "commit unknown")."""
    if not target.is_dir():
        staging = target.with_name(f".{target.name}-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(tree, staging, symlinks=True,
                            ignore=shutil.ignore_patterns(".git", "build"))
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    variants = target / _VARIANT_LIST
    if variants.is_file():
        text = variants.read_text(encoding="utf-8")
        changed = leave_out_variants(text, left_out)
        if changed != text:
            variants.write_text(changed, encoding="utf-8")
    sources.stamp_commit(target, commit)


def root_library(root: BuildRoot, name: str) -> Path:
    """The real file behind `name` (a SONAME) in the root's library folders, links followed
    inside the root (an absolute link there points into the root, not at this machine)."""
    for folder in _LIBRARY_DIRS:
        inside = f"/{folder}/{name}"
        for _ in range(16):
            candidate = root.host_path(inside)
            if not candidate.is_symlink():
                break
            link = os.readlink(candidate)
            inside = os.path.normpath(link if link.startswith("/")
                                      else f"{os.path.dirname(inside)}/{link}")
        if candidate.is_file() and not candidate.is_symlink():
            return candidate
    raise EngineError(f"build root {root.path} has no {name} to carry with the engine")
