"""Freezing lalo with PyInstaller (`build/lalo-ai.spec`): a one-folder app for bundles, cached by
the hash of everything that goes into it, and one-file executables with extra entries.

The spec reads a plan (JSON) written here and writes back a report: the Python components it
collected, for NOTICE. PyInstaller runs as a subprocess with a fixed hash seed and
SOURCE_DATE_EPOCH, so its output depends on its inputs only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata as metadata
import json
import os
import shutil
import site
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import launcher
from launcher import paths
from launcher.engines.registry import exe_name, platform_tag
from launcher.errors import PackagingError
from launcher.packaging.atomic import remove_stale
from launcher.packaging.formats.archive import fixed_mtime
from launcher.packaging.frozen import freeze_root
from launcher.packaging.frozen.entry import SELF_CHECK_FLAG
from launcher.packaging.frozen.freeze_root import FreezeRoot
from launcher.packaging.notices.notice import Packaged
from launcher.toolrun import run_lines

SPEC_FILE = "lalo-ai.spec"
ENTRY_SCRIPT = "lalo_ai.py"
APP_NAME = "lalo"
REPORT = "report.json"
SMOKE_TIMEOUT = 120.0
# Frozen apps kept in the cache, most recently used first (one per lalo + environment).
KEEP_APPS = 3
# Not needed by a running lalo, or development only. numpy and gguf-py only write models
# (`doctor --bench`, `up --demo`: see launcher/packaging/frozen/entry.py LEFT_OUT); leaving them
# out saves about 13 MB of the binary and 40 MB unpacked at each start.
EXCLUDES: tuple[str, ...] = (
    "numpy", "gguf", "matplotlib", "PIL", "contourpy", "kiwisolver", "fontTools",
    "hf_xet", "tkinter", "_tkinter", "pytest", "_pytest", "mypy",
    "openai", "playwright", "greenlet", "setuptools", "pkg_resources", "IPython",
    "readline", "pydoc_data", "lib2to3", "unittest", "curses",
    # reached only through optional imports of libraries lalo uses (huggingface_hub's model
    # cards and webhooks, fsspec's remote file systems, uvicorn's env_file), when installed
    "fastapi", "jinja2", "opentelemetry", "dotenv", "requests", "llama_cpp",
)
Mode = Literal["onedir", "onefile"]
Report = Callable[[str], None]
_STAGES = ("Analyzing ", "Building PYZ", "Building PKG", "Building EXE", "Building COLLECT",
           "Looking for dynamic libraries")


@dataclass(frozen=True)
class TocEntry:
    """An extra entry of the frozen app: `dest` inside it, `source` a file (or, for SYMLINK,
    the link's relative target), typecode DATA (stored), BINARY (compressed) or SYMLINK."""

    dest: str
    source: str
    typecode: Literal["DATA", "BINARY", "SYMLINK"]


@dataclass(frozen=True)
class FreezePlan:
    mode: Mode
    name: str
    extra: tuple[TocEntry, ...] = ()
    excludes: tuple[str, ...] = EXCLUDES
    # one-file builds carry NOTICE + LICENSES inside: these components plus the Python ones
    notice_product: str | None = None
    notice_components: tuple[Packaged, ...] = ()
    notice_dir: Path | None = None
    notice_dest: str = ""

    def to_json(self, report: Path) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "name": self.name,
            "extra": [[e.dest, e.source, e.typecode] for e in self.extra],
            "excludes": list(self.excludes),
            "report": str(report),
            "notice": None if self.notice_dir is None else {
                "product": self.notice_product,
                "components": [c.to_json() for c in self.notice_components],
                "dir": str(self.notice_dir),
                "dest": self.notice_dest,
            },
        }


@dataclass(frozen=True)
class Frozen:
    """A PyInstaller output: the executable (one-file) or the app folder (one-folder)."""

    path: Path
    python: tuple[Packaged, ...]
    warnings: tuple[str, ...]
    seconds: float
    reused: bool = False
    log: Path | None = None


def recipe_dir(candidates: Sequence[Path] | None = None) -> Path:
    """`build/` of the lalo source checkout, where the spec and entry script live."""
    found = candidates if candidates is not None else (
        Path(launcher.__file__).resolve().parent.parent / "build",
        Path.cwd() / "build",
    )
    for folder in found:
        if (folder / SPEC_FILE).is_file() and (folder / ENTRY_SCRIPT).is_file():
            return folder
    raise PackagingError(
        f"no build/{SPEC_FILE} found (looked in {', '.join(str(f) for f in found)}); "
        "run `lalo build` from a lalo source checkout"
    )


def check_pyinstaller(python: str = sys.executable) -> str:
    try:
        return metadata.version("pyinstaller")
    except metadata.PackageNotFoundError:
        raise PackagingError(
            "PyInstaller is not installed; pip install 'lalo-launcher[packaging]'"
        ) from None


def app_key(recipes: Path, excludes: Sequence[str] = EXCLUDES, in_root: str = "") -> str:
    """Hash of everything a one-folder lalo is made of: lalo's files, the recipe, every
    installed distribution's version and metadata (the frozen app ships dist-info, and lalo's
    own METADATA carries the README: a README-only change must not reuse an app holding the
    old one), the Python and the platform (and the build root's key when frozen in one)."""
    digest = hashlib.sha256()
    package = Path(launcher.__file__).resolve().parent
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            digest.update(path.relative_to(package).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    for name in (SPEC_FILE, ENTRY_SCRIPT):
        digest.update(name.encode() + b"\0" + (recipes / name).read_bytes())
    dists = sorted(metadata.distributions(path=freeze_path()),
                   key=lambda d: (d.metadata["Name"] or "", d.version))
    for dist in dists:
        digest.update(f"{dist.metadata['Name']}=={dist.version}\n".encode())
        for name in ("METADATA", "entry_points.txt"):
            digest.update(hashlib.sha256((dist.read_text(name) or "").encode()).digest())
    digest.update(f"{sys.version}|{platform_tag()}|{','.join(excludes)}|{in_root}".encode())
    return digest.hexdigest()


def freeze_path() -> list[str]:
    """Where PyInstaller's process finds the distributions it ships: PYTHONPATH, then this
    Python's site-packages. Not this process's whole `sys.path`: pytest and `python -m` put the
    checkout on it, whose `*.egg-info` (left by `pip install -e`) is not shipped, and the key
    would change with how lalo was started."""
    extra = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    return [*extra, *site.getsitepackages()]


def choose_root(report: Report, warnings: list[str]) -> FreezeRoot | None:
    """Where to freeze: the Debian 11 root (Linux x86-64, as root, with debootstrap), else this
    machine's Python, saying what that means for the clients in `warnings`."""
    if not freeze_root.wanted():
        return None
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        warnings.append(
            "the frozen lalo was built with this machine's Python, not in the Debian 11 build "
            "root (that needs root and debootstrap): it needs this machine's glibc or newer"
        )
        return None
    return freeze_root.prepare(paths.cache_dir(), report)


def packaging_dir() -> Path:
    return paths.cache_dir() / "packaging"


def frozen_app(report: Report, *, recipes: Path | None = None, force: bool = False) -> Frozen:
    """The one-folder lalo for bundles (`<cache>/packaging/app-<key>/lalo/`), frozen once per
    set of inputs; later builds reuse it, byte for byte."""
    recipes = recipes or recipe_dir()
    notes: list[str] = []
    in_root = choose_root(report, notes)
    key = app_key(recipes, in_root=in_root.key if in_root else "")[:16]
    root = packaging_dir() / f"app-{key}"
    if not force and (root / REPORT).is_file() and (root / APP_NAME).is_dir():
        python, warnings = _read_report(root / REPORT)
        _mark_used(root)
        return Frozen(root / APP_NAME, python, (*warnings, *notes), 0.0, reused=True)
    remove_stale(packaging_dir())  # frozen apps half made by a killed build
    staging = packaging_dir() / f".app-{key}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        result = run_pyinstaller(
            FreezePlan(mode="onedir", name=APP_NAME), dist=staging / "dist",
            work=packaging_dir() / "work" / "app", report=report, recipes=recipes,
            in_root=in_root,
        )
        (staging / "dist" / APP_NAME).rename(staging / APP_NAME)
        (staging / "report.tmp").rename(staging / REPORT)
        shutil.rmtree(staging / "dist")
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _mark_used(root)
    return Frozen(root / APP_NAME, result.python, (*result.warnings, *notes), result.seconds,
                  log=result.log)


def _mark_used(root: Path) -> None:
    """Record that `root` was just used, and drop the least recently used frozen apps beyond
    KEEP_APPS: each change to lalo or its environment freezes a new one (about 60 MB)."""
    try:
        os.utime(root)
    except OSError:
        return
    prune_apps(root.parent, keep=KEEP_APPS)


def prune_apps(folder: Path, keep: int) -> list[Path]:
    """Remove all but the `keep` most recently used `app-*` folders; returns those removed.
    Staging folders (`.app-*`, builds in progress) are never touched."""
    apps: list[tuple[int, Path]] = []
    for path in folder.glob("app-*"):
        try:
            apps.append((path.stat().st_mtime_ns, path))
        except OSError:
            continue
    apps.sort(reverse=True)
    removed = [path for _, path in apps[keep:]]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def run_pyinstaller(
    plan: FreezePlan,
    *,
    dist: Path,
    work: Path,
    report: Report,
    recipes: Path | None = None,
    python: str = sys.executable,
    clean: bool = True,
    in_root: FreezeRoot | None = None,
) -> Frozen:
    """Run `python -m PyInstaller build/lalo-ai.spec -- --plan P`; the report (Python
    components) goes to `dist/../report.tmp`. PackagingError with the log's tail on failure.
    Without `clean`, PyInstaller reuses what it analysed in `work` when nothing changed.
    `in_root`: run it inside that build root (old glibc) on a copy of the plan's inputs."""
    check_pyinstaller(python)
    recipes = recipes or recipe_dir()
    dist.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report_path = dist.parent / "report.tmp"
    plan_path = work / "plan.json"
    log_path = work / "pyinstaller.log"
    # Reproducible output (PyInstaller honours both), and no stray user site-packages.
    settings = {"PYTHONHASHSEED": "0", "SOURCE_DATE_EPOCH": str(fixed_mtime()),
                "PYTHONNOUSERSITE": "1"}
    log_path.write_text("", encoding="utf-8")
    if in_root is not None:
        report(f"freeze: in the {in_root.root.label} build root ({in_root.root.path})")
        inside = _RootJob(in_root, plan, log_path)
        argv, env, cwd, moved = inside.argv(settings), dict(os.environ), Path("/"), inside
    else:
        plan_path.write_text(json.dumps(plan.to_json(report_path), indent=2), encoding="utf-8")
        argv = [
            python, "-m", "PyInstaller", str(recipes / SPEC_FILE), "--noconfirm",
            *(["--clean"] if clean else []),
            "--distpath", str(dist), "--workpath", str(work / "build"), "--log-level", "INFO",
            "--", "--plan", str(plan_path),
        ]
        env = {**os.environ, **settings}
        cwd, moved = recipes, None
    report(f"freezing lalo with PyInstaller ({plan.mode}); log: {log_path}")
    started = time.monotonic()
    tail: list[str] = []
    with log_path.open("a", encoding="utf-8") as log_file:

        def on_line(line: str) -> None:
            log_file.write(line + "\n")
            tail.append(line)
            del tail[:-25]
            message = line.split(": ", 1)[-1]
            if message.startswith(_STAGES) and "completed" not in message:
                report(f"  {message}")

        code = run_streaming(argv, env=env, cwd=cwd, on_line=on_line)
    if code == 0 and moved is not None:
        moved.collect(dist, report_path, plan)
    if code != 0:
        raise PackagingError(
            f"PyInstaller failed (exit {code}); last lines:\n" + "\n".join(tail[-15:])
            + f"\nfull log: {log_path}"
        )
    python_parts, warnings = _read_report(report_path)
    output = dist / (exe_name(plan.name) if plan.mode == "onefile" else plan.name)
    smoke_test(output / exe_name(plan.name) if plan.mode == "onedir" else output)
    return Frozen(
        path=output, python=python_parts, warnings=warnings,
        seconds=time.monotonic() - started, log=log_path,
    )


class _RootJob:
    """A PyInstaller run inside a build root: lalo installed there, the plan's inputs linked
    (or copied) in, its paths rewritten; `collect` brings the outputs back."""

    def __init__(self, frozen_root: FreezeRoot, plan: FreezePlan, log: Path) -> None:
        self.root = frozen_root
        self.recipes = freeze_root.install_lalo(frozen_root, log)
        self.job = f"{freeze_root.WORK}/job"
        host = frozen_root.root.host_path(self.job)
        shutil.rmtree(host, ignore_errors=True)
        (host / "inputs").mkdir(parents=True)
        extra = []
        for index, entry in enumerate(plan.extra):
            if entry.typecode == "SYMLINK":
                extra.append(entry)
                continue
            name = f"inputs/{index}/{Path(entry.source).name}"
            (host / name).parent.mkdir(parents=True)
            _link_or_copy(Path(entry.source), host / name)
            extra.append(TocEntry(entry.dest, f"{self.job}/{name}", entry.typecode))
        self.plan = dataclasses.replace(
            plan, extra=tuple(extra),
            notice_dir=Path(f"{self.job}/notice") if plan.notice_dir is not None else None,
        )
        (host / "plan.json").write_text(json.dumps(
            self.plan.to_json(Path(f"{self.job}/report.json")), indent=2), encoding="utf-8")
        self.host = host

    def argv(self, settings: dict[str, str]) -> list[str]:
        return self.root.argv([
            self.root.python, "-m", "PyInstaller", f"{self.recipes}/{SPEC_FILE}", "--noconfirm",
            "--clean", "--distpath", f"{self.job}/dist", "--workpath", f"{self.job}/work",
            "--log-level", "INFO", "--", "--plan", f"{self.job}/plan.json",
        ], settings, self.recipes)

    def collect(self, dist: Path, report_path: Path, plan: FreezePlan) -> None:
        name = exe_name(plan.name) if plan.mode == "onefile" else plan.name
        target = dist / name
        if target.is_dir():
            shutil.rmtree(target)
        shutil.move(str(self.host / "dist" / name), str(target))
        shutil.copyfile(self.host / "report.json", report_path)
        if plan.notice_dir is not None:
            shutil.rmtree(plan.notice_dir, ignore_errors=True)
            shutil.copytree(self.host / "notice", plan.notice_dir)
        shutil.rmtree(self.host, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def run_streaming(
    argv: Sequence[str], *, env: dict[str, str], cwd: Path, on_line: Callable[[str], None]
) -> int:
    """Run argv (toolrun.run_lines), passing each output line to on_line; returns the exit
    code. Interrupted, it stops the command's process group (TERM, wait, KILL) first."""
    try:
        return run_lines(argv, cwd=cwd, env=env, on_line=on_line)
    except OSError as exc:
        raise PackagingError(f"cannot run {argv[0]}: {exc}") from exc


def smoke_test(executable: Path, timeout: float = SMOKE_TIMEOUT) -> str:
    """`EXECUTABLE --version`, `--help` and `--self-check` (every lalo module imports) must
    answer: a frozen lalo that cannot import what it needs fails the build here, not on a
    client's machine."""
    version = ""
    for flag in ("--version", "--help", SELF_CHECK_FLAG):
        try:
            done = subprocess.run(
                [str(executable), flag], capture_output=True, text=True, timeout=timeout,
                check=False, stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PackagingError(f"the frozen lalo does not start: {executable}: {exc}") from exc
        if done.returncode != 0 or not done.stdout.strip():
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-10:])
            raise PackagingError(
                f"the frozen lalo does not start ({executable} {flag}, exit {done.returncode}):"
                f"\n{tail}"
            )
        version = version or done.stdout.strip()
    return version


def _read_report(path: Path) -> tuple[tuple[Packaged, ...], tuple[str, ...]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        python = tuple(Packaged.from_json(item) for item in data["python"])
        warnings = tuple(str(w) for w in data["warnings"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PackagingError(f"{path}: no usable PyInstaller report: {exc}") from exc
    return python, warnings
