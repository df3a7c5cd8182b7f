"""The two Windows tools the target runs on Linux: mingw-w64 compiles the launcher (launcher.c,
cached by its source, compiler and flags), and NSIS's makensis builds the installer."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from launcher.errors import PackagingError

CC = "x86_64-w64-mingw32-gcc-posix"
CC_PACKAGE = "gcc-mingw-w64-x86-64-posix"
MAKENSIS = "makensis"
# static: no mingw DLL beside it; no PE timestamp, so the same source makes the same bytes
CFLAGS = ("-O2", "-s", "-std=c11", "-Wall", "-Wextra", "-static", "-Wl,--no-insert-timestamp")
LIBS = ("-lbcrypt", "-lws2_32", "-lshell32")
COMPILE_TIMEOUT = 300.0
NSIS_TIMEOUT = 3600.0  # compressing a large engine with lzma on 2 cores


def launcher_source() -> bytes:
    return (resources.files("launcher.packaging.windows") / "launcher.c").read_bytes()


def launcher_exe(cache: Path) -> Path:
    """The compiled launcher, `<cache>/windows-launcher/<key>/launcher.exe`, built if missing."""
    cc = shutil.which(CC)
    if cc is None:
        raise PackagingError(f"{CC} not found: the Windows launcher is compiled with mingw-w64 "
                             f"(apt-get install {CC_PACKAGE})")
    version = _run([cc, "--version"], "the mingw-w64 compiler").splitlines()[0]
    source = launcher_source()
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(CFLAGS + LIBS).encode()]))
    folder = cache / "windows-launcher" / key.hexdigest()[:16]
    exe = folder / "launcher.exe"
    if exe.is_file():
        return exe
    folder.mkdir(parents=True, exist_ok=True)
    work = folder / f".build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        (work / "launcher.c").write_bytes(source)
        _run([cc, *CFLAGS, "-o", str(work / "launcher.exe"), str(work / "launcher.c"), *LIBS],
             "compiling the Windows launcher", timeout=COMPILE_TIMEOUT)
        os.replace(work / "launcher.exe", exe)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return exe


def makensis(script: Path) -> None:
    """Build the installer `script` describes (its OutFile); PackagingError with NSIS's words."""
    tool = shutil.which(MAKENSIS)
    if tool is None:
        raise PackagingError("makensis not found: the Windows installer is built with NSIS "
                             "(apt-get install nsis)")
    _run([tool, "-V2", "-INPUTCHARSET", "UTF8", str(script)], "building the installer with NSIS",
         timeout=NSIS_TIMEOUT)


def _run(argv: list[str], what: str, timeout: float = 60.0) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PackagingError(f"{what} failed: {exc}") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise PackagingError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout
