"""Freezing lalo inside the Debian 11 build root (launcher/engines/buildroot.py), so that the
frozen lalo of a bundle or of the single binary needs glibc 2.31, not this machine's.

lalo needs Python >= 3.11 and Debian 11 has 3.9, so the root gets a CPython 3.11 compiled from
Debian 12's own source package (`apt-get source python3.11`, the upstream tarball; about 5 min
once), in `/opt/python3.11`. Its packages are wheels this machine's pip downloads (its index
and settings, the versions installed here), installed in the root without network. Each part
is cached by its inputs: the root by its packages, the Python by its version, the environment
by its wheel list; lalo itself is reinstalled from a wheel for each freeze (seconds).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import os
import platform
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import launcher
from launcher.engines.buildroot import BuildRoot, check_can_chroot, debian_mirror, ensure_root
from launcher.errors import EngineError, PackagingError
from launcher.toolrun import run_lines

Report = Callable[[str], None]
# Off: freeze with this machine's Python (the frozen lalo then needs this machine's glibc).
ENV_SWITCH = "LALO_FREEZE_IN_ROOT"
PYTHON_SOURCE = "python3.11"  # Debian 12's source package: the upstream tarball in it
SOURCE_SUITE = "bookworm"
PREFIX = "/opt/python3.11"
PYTHON = f"{PREFIX}/bin/python3.11"
PYTHON_READY = f"{PREFIX}/.lalo-ready"
WORK = "/lalo/freeze"
CONSTRAINTS = "/lalo/constraints.txt"
WHEEL_PLATFORMS = ("manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64", "any")
# Not constrained to this environment's versions: lalo itself and what builds its wheel.
_NOT_CONSTRAINED = {"lalo-launcher", "setuptools", "wheel", "pip"}


@dataclass(frozen=True)
class FreezeRoot:
    root: BuildRoot
    python: str  # the environment's python, inside the root
    key: str  # identifies root, Python and wheels: part of the frozen app's cache key

    def run(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        _run(self.root, argv, log, env)

    def argv(self, argv: Sequence[str], env: dict[str, str], cwd: str) -> list[str]:
        return self.root.chroot_argv(argv, env, cwd)


def wanted() -> bool:
    """Freeze in the root on Linux x86-64 unless LALO_FREEZE_IN_ROOT=0."""
    return (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
            and os.environ.get(ENV_SWITCH, "1") != "0")


def prepare(cache_root: Path, report: Report, *, python: str = sys.executable) -> FreezeRoot:
    """The root with its Python 3.11 and an environment holding lalo's dependencies and
    PyInstaller at this machine's versions; PackagingError says what is missing."""
    try:
        check_can_chroot()
        root = ensure_root(cache_root, report=report)
    except EngineError as exc:
        raise PackagingError(f"{exc} (or set {ENV_SWITCH}=0 to freeze with this machine's "
                             "Python; the frozen lalo then needs this machine's glibc)") from exc
    log = cache_root / "logs" / f"freeze-{root.path.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    _ensure_python(root, log, report)
    wheels = _download_wheels(root, python, log, report)
    # the Python's own build (a hash of its libpython) too: a root made again compiles a
    # CPython that is not byte-identical, and apps frozen with the old one must not be reused
    built = root.host_path(PYTHON_READY).read_text(encoding="utf-8").strip()
    key = hashlib.sha256("\n".join([root.path.name, PYTHON, built, wheels]).encode()).hexdigest()[:12]
    venv = f"/lalo/venv-{key}"
    ready = root.host_path(f"{venv}/.lalo-ready")
    if not ready.is_file():
        report(f"freeze: installing lalo's dependencies in {root.label} (once)")
        shutil.rmtree(root.host_path(venv), ignore_errors=True)
        _run(root, [PYTHON, "-m", "venv", venv], log)
        _run(root, [f"{venv}/bin/python", "-m", "pip", "install", "--no-index", "--find-links",
                    "/lalo/wheels", "-c", CONSTRAINTS, *requirements()], log)
        ready.write_text("\n".join(wheels) + "\n", encoding="utf-8")
    return FreezeRoot(root=root, python=f"{venv}/bin/python", key=key)


def install_lalo(frozen_root: FreezeRoot, log: Path, *, python: str = sys.executable) -> str:
    """lalo's current source built into a wheel here and installed in the root's environment;
    returns where its recipe folder (`build/`) is inside the root."""
    project = Path(launcher.__file__).resolve().parent.parent
    inside = f"{WORK}/src"
    target = frozen_root.root.host_path(inside)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (project / name).is_file():
            shutil.copy2(project / name, target / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(project / "launcher", target / "launcher", ignore=ignore)
    shutil.copytree(project / "build", target / "build", ignore=ignore)
    env = frozen_root.python
    frozen_root.run([env, "-m", "pip", "install", "--no-index", "--no-deps",
                     "--no-build-isolation", "--force-reinstall", inside], log)
    return f"{inside}/build"


def _ensure_python(root: BuildRoot, log: Path, report: Report) -> None:
    if root.host_path(PYTHON_READY).is_file():
        return
    report(f"freeze: compiling CPython 3.11 in {root.label} from Debian's {PYTHON_SOURCE} "
           f"source (once, about 5 min; log: {log})")
    sources = root.host_path("/etc/apt/sources.list.d/lalo-python-src.list")
    sources.write_text(f"deb-src {debian_mirror()} {SOURCE_SUITE} main\n", encoding="utf-8")
    _copy_resolv(root)
    src = "/lalo/python-src"
    root.host_path(src).mkdir(parents=True, exist_ok=True)
    _run(root, ["apt-get", "update", "-qq"], log)
    _run(root, ["sh", "-ec", f"cd {src} && apt-get source --download-only -qq {PYTHON_SOURCE}"],
         log)
    tarballs = sorted(root.host_path(src).glob(f"{PYTHON_SOURCE}_*.orig.tar.*"))
    if not tarballs:
        raise PackagingError(f"apt-get source {PYTHON_SOURCE} gave no .orig tarball; log: {log}")
    jobs = os.cpu_count() or 1
    _run(root, ["sh", "-ec", f"""
cd {src}; rm -rf build; mkdir build; tar -xf {tarballs[-1].name} -C build --strip-components=1
cd build
./configure --prefix={PREFIX} --enable-shared LDFLAGS=-Wl,-rpath,{PREFIX}/lib --without-ensurepip \\
  --disable-test-modules
make -j{jobs}
make install
{PYTHON} -c 'import ssl, ctypes, lzma, bz2, zlib, sqlite3'
{PYTHON} -m ensurepip
sha256sum {PREFIX}/lib/libpython3.11.so.1.0 > {PYTHON_READY}
"""], log)


def _download_wheels(root: BuildRoot, python: str, log: Path, report: Report) -> str:
    """lalo's dependencies and PyInstaller as wheels for the root (cp311, glibc <= 2.31), at
    the versions installed here (constraints), into the root's /lalo/wheels; returns the text
    that identifies the set (requirements and constraints)."""
    wheel_dir = root.host_path("/lalo/wheels")
    wheel_dir.mkdir(parents=True, exist_ok=True)
    lines = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                    if d.metadata["Name"] and d.metadata["Name"].lower() not in _NOT_CONSTRAINED})
    constraints = "\n".join(lines) + "\n"
    root.host_path(CONSTRAINTS).write_text(constraints, encoding="utf-8")
    platforms = [arg for tag in WHEEL_PLATFORMS for arg in ("--platform", tag)]
    argv = [python, "-m", "pip", "download", "-q", "--only-binary=:all:", *platforms,
            "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
            "--abi", "abi3", "--abi", "none", "-d", str(wheel_dir),
            "-c", str(root.host_path(CONSTRAINTS)), *requirements()]
    _run_host(argv, log, report, "downloading the wheels for the frozen lalo")
    return "\n".join([*requirements(), constraints])


def requirements() -> list[str]:
    """lalo's runtime dependencies as its metadata declares them (environment markers kept),
    PyInstaller, and what builds lalo's own wheel."""
    try:
        requires = metadata.requires("lalo-launcher") or []
    except metadata.PackageNotFoundError as exc:
        raise PackagingError("lalo is not installed (pip install -e .)") from exc
    # setuptools 77 reads pyproject.toml's SPDX `license = "..."` (older ones refuse it)
    return [*(r for r in requires if "extra ==" not in r), "pyinstaller", "setuptools>=77", "wheel"]


def _copy_resolv(root: BuildRoot) -> None:
    """The root reaches Debian's mirror by name: this machine's resolver settings."""
    source = Path("/etc/resolv.conf")
    if source.is_file():
        target = root.host_path("/etc/resolv.conf")
        if target.is_symlink():
            target.unlink()
        shutil.copyfile(source, target)


def _run(root: BuildRoot, argv: Sequence[str], log: Path, env: dict[str, str] | None = None
         ) -> None:
    _run_host(root.chroot_argv(argv, env), log, None, None)


def _run_host(argv: Sequence[str], log: Path, report: Report | None, what: str | None) -> None:
    if report is not None and what is not None:
        report(f"freeze: {what}")
    tail: list[str] = []
    with log.open("a", encoding="utf-8") as log_file:
        log_file.write("$ " + " ".join(argv) + "\n")
        log_file.flush()

        def on_line(line: str) -> None:
            log_file.write(line + "\n")
            tail.append(line)
            del tail[:-15]

        try:
            code = run_lines(argv, cwd=Path("/"), on_line=on_line)
        except OSError as exc:
            raise PackagingError(f"cannot run {argv[0]}: {exc}") from exc
    if code != 0:
        raise PackagingError(f"`{' '.join(argv[:8])}...` failed (exit {code}):\n  "
                             + "\n  ".join(tail) + f"\nfull log: {log}")
