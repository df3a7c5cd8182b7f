"""Old-glibc build roots: a Debian 11 (bullseye, glibc 2.31) system made with debootstrap, in
which the portable engine is compiled, as manylinux builds on an old base, so that what it
makes runs on the clients' older Linux too.

A root is cached under `<cache>/buildroots/debian-<suite>-<key>/`, `key` a hash of its inputs
(suite, mirror, packages): made once (about 90 s plus the packages), reused after; making one
removes the roots of that suite not used for PRUNE_AFTER_DAYS (roots for other inputs: the
build root and the tests' minimal root live side by side). Commands run
in it through `chroot` with a clean environment; making and entering one needs root.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import EngineError
from launcher.toolrun import run_lines

SUITE = "bullseye"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# What the portable engine's build needs inside the root.
ENGINE_PACKAGES = ("cmake", "make", "g++", "ca-certificates")
# What building CPython (for the frozen lalo) needs beside them; one root serves both.
# (libsqlite3-dev: the activity store's sqlite3; without it CPython builds without _sqlite3)
PYTHON_PACKAGES = ("libssl-dev", "zlib1g-dev", "libffi-dev", "libbz2-dev", "liblzma-dev",
                   "libsqlite3-dev", "xz-utils")
BUILD_PACKAGES = (*ENGINE_PACKAGES, *PYTHON_PACKAGES)
READY = ".lalo-root-ready"  # written when complete; its mtime says when the root was last used
PRUNE_AFTER_DAYS = 14
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_URI_LINE = re.compile(r"^\s*URIs:\s*(\S+)", re.MULTILINE)
_DEB_LINE = re.compile(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", re.MULTILINE)
_GLIBC = re.compile(r"\bGLIBC_(\d+(?:\.\d+)+)\b")

Report = Callable[[str], None]
Runner = Callable[[Sequence[str], Callable[[str], None]], int]


@dataclass(frozen=True)
class BuildRoot:
    path: Path
    suite: str
    packages: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"debian-{self.suite}"

    def chroot_argv(self, argv: Sequence[str], env: dict[str, str] | None = None,
                    cwd: str | None = None) -> list[str]:
        """`argv` run inside the root from a clean environment (`env -i`, PATH and HOME set),
        in `cwd` (a path inside the root) if given."""
        settings = {"PATH": CLEAN_PATH, "HOME": "/root", "LC_ALL": "C.UTF-8", **(env or {})}
        return ["chroot", str(self.path), "/usr/bin/env", "-i", *(["-C", cwd] if cwd else []),
                *(f"{k}={v}" for k, v in settings.items()), *argv]

    def host_path(self, inside: str) -> Path:
        """Where a path inside the root (`/build/x`) is on this machine."""
        return self.path / inside.lstrip("/")


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses here (sources.list or deb822 .sources), else Debian's own."""
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for match in [*_URI_LINE.finditer(text), *_DEB_LINE.finditer(text)]:
            uri = match.group(1).rstrip("/")
            if uri.startswith(("http://", "https://")) and uri.endswith("/debian"):
                return uri
    return DEFAULT_MIRROR


def root_key(suite: str, mirror: str, packages: Sequence[str]) -> str:
    text = "\n".join([suite, mirror, *sorted(set(packages))])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _default_runner(argv: Sequence[str], on_line: Callable[[str], None]) -> int:
    try:
        return run_lines(argv, cwd=Path("/"), on_line=on_line)
    except OSError as exc:
        raise EngineError(f"cannot run {argv[0]}: {exc}") from exc


def check_can_chroot(which: Callable[[str], str | None] = shutil.which) -> None:
    """A build root needs root (chroot, debootstrap) and debootstrap itself."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        raise EngineError("old-glibc build roots are made on Linux only")
    if os.geteuid() != 0:
        raise EngineError("the portable engine is built inside a Debian 11 root, which needs "
                          "root (debootstrap, chroot): run as root, or use --variant native")
    if which("debootstrap") is None:
        raise EngineError("debootstrap not found; install it, e.g. `apt-get install debootstrap`")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # a second maker waits, then finds the root made
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_root(
    cache_root: Path,
    packages: Sequence[str] = BUILD_PACKAGES,
    *,
    suite: str = SUITE,
    mirror: str | None = None,
    report: Report = lambda text: None,
    log_path: Path | None = None,
    runner: Runner = _default_runner,
    which: Callable[[str], str | None] = shutil.which,
) -> BuildRoot:
    """The cached root for these inputs, made first if missing (debootstrap into a staging
    folder, renamed into place once complete, so a killed run leaves no half root behind)."""
    mirror = mirror or debian_mirror()
    wanted = tuple(sorted(set(packages)))
    folder = cache_root / "buildroots"
    path = folder / f"debian-{suite}-{root_key(suite, mirror, wanted)}"
    root = BuildRoot(path=path, suite=suite, packages=wanted)
    if (path / READY).is_file():
        _used(path)
        return root
    check_can_chroot(which)
    with _locked(folder / f".lock-{path.name}"):
        if (path / READY).is_file():
            return root
        staging = folder / f".staging-{path.name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        log_path = log_path or folder / f"{path.name}.log"
        argv = ["debootstrap", "--variant=minbase",
                *([f"--include={','.join(wanted)}"] if wanted else []),
                suite, str(staging), mirror]
        report(f"making a Debian {suite} build root with debootstrap (once; log: {log_path})")
        try:
            with log_path.open("w", encoding="utf-8", buffering=1) as log_file:
                log_file.write("$ " + " ".join(argv) + "\n")

                def on_line(line: str) -> None:
                    log_file.write(line + "\n")

                code = runner(argv, on_line)
            if code != 0:
                tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-8:]
                raise EngineError(f"debootstrap {suite} failed (exit {code}):\n  "
                                  + "\n  ".join(tail) + f"\nfull log: {log_path}")
            (staging / READY).write_text(" ".join(wanted) + "\n", encoding="utf-8")
            staging.rename(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for line in prune_roots(folder, suite, keep=path):
            report(line)
    return root


def _used(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path / READY)


def prune_roots(folder: Path, suite: str, keep: Path,
                days: float = PRUNE_AFTER_DAYS) -> list[str]:
    """Remove the other complete roots of `suite` that nothing used for `days` (0.3-2.6 GB
    each: a root made for packages lalo no longer asks for is never used again); a root with
    anything mounted inside is left alone. One line per root removed or left."""
    lines: list[str] = []
    cutoff = time.time() - days * 86400
    for other in sorted(folder.glob(f"debian-{suite}-*")):
        ready = other / READY
        if other == keep or not other.is_dir() or not ready.is_file():
            continue
        try:
            if ready.stat().st_mtime > cutoff:
                continue
        except OSError:
            continue
        mounted = [name for name in ("proc", "sys", "dev", "dev/pts") if (other / name).is_mount()]
        if mounted:
            lines.append(f"left the old build root {other} ({', '.join(mounted)} mounted in it)")
            continue
        ready.unlink()  # no longer complete for anyone who finds it from now on
        shutil.rmtree(other, ignore_errors=True)
        other.with_name(other.name + ".log").unlink(missing_ok=True)
        lines.append(f"removed the build root {other} (unused for {days:g} days)")
    return lines


def glibc_required(files: Sequence[Path]) -> str | None:
    """The newest GLIBC_x.y symbol version any of `files` needs (`objdump -T`), or None when
    objdump is missing or none names one: the oldest glibc they can run on."""
    objdump = shutil.which("objdump")
    if objdump is None:
        return None
    versions: set[tuple[int, ...]] = set()
    for path in files:
        try:
            done = subprocess.run([objdump, "-T", str(path)], capture_output=True, text=True,
                                  errors="replace", timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        versions.update(tuple(int(p) for p in m.group(1).split("."))
                        for m in _GLIBC.finditer(done.stdout))
    return ".".join(str(p) for p in max(versions)) if versions else None
