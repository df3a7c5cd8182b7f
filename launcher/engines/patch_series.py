"""lalo's patch series on llama.cpp (`launcher/engines/patches/NNNN-*.patch`), as Ollama keeps
its own: one change a file, each saying why it exists and its upstream status, applied in order
to the pinned llama.cpp source by `lalo engine build`. The series' id (a hash of the patches'
names and diffs, not of their descriptions) is part of the engine's cache key and manifest, so
a changed series builds a new engine.

The pinned source in the cache stays pristine: the series is applied to a copy
(`<sources>/llama.cpp-<commit7>-p<id>/`) whose untouched files are hard links to it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from launcher.engines.source import stamp_commit
from launcher.errors import EngineError

_TOUCHED = re.compile(r"^\+\+\+ b/(\S+)", re.MULTILINE)
_UPSTREAM = re.compile(r"^Upstream-Status:\s*(.+)$", re.MULTILINE)
_SEPARATOR = re.compile(r"^---$\n?", re.MULTILINE)
_SUBJECT = re.compile(r"^Subject:\s*(?:\[PATCH[^\]]*\]\s*)?(.+)$", re.MULTILINE)
PATCH_TIMEOUT = 60.0
THREADS_ROUTE = "0002-server-set-threads-route.patch"
"""The patch that lets lalo change a running server's threads (the governor needs it)."""
SLEEP_SAVE_SLOTS = "0003-server-sleep-save-slots.patch"
"""The patch that saves a server's slots before its idle sleep and restores them on waking."""
NOTICES_GONE_CLIENTS = "0004-server-non-stream-notices-closed-connection.patch"
"""The patch that lets a non-streamed request notice its client left while others generate."""


@dataclass(frozen=True)
class Patch:
    name: str  # "0001-server-join-router-proxy-threads.patch"
    text: str

    @property
    def subject(self) -> str:
        match = _SUBJECT.search(self.text)
        return match.group(1).strip() if match else self.name

    @property
    def upstream(self) -> str:
        match = _UPSTREAM.search(self.text)
        return match.group(1).strip() if match else "unknown"

    @property
    def change(self) -> str:
        """The diff: what follows the description's `---` line (all of it without one)."""
        match = _SEPARATOR.search(self.text)
        return self.text[match.end():] if match else self.text

    @property
    def touched(self) -> list[str]:
        """The files the patch changes or adds, relative to the tree."""
        return sorted(set(_TOUCHED.findall(self.text)))


def series() -> list[Patch]:
    """The patches shipped with lalo, in order."""
    folder = resources.files("launcher.engines") / "patches"
    found = sorted((entry.name, entry.read_text(encoding="utf-8")) for entry in folder.iterdir()
                   if entry.name.endswith(".patch"))
    return [Patch(name, text) for name, text in found]


def series_id(patches: list[Patch]) -> str:
    """8 hex digits naming the series (empty for none): names and changes, in order. A patch's
    description is left out: mending its words does not rebuild every engine."""
    if not patches:
        return ""
    digest = hashlib.sha256()
    for patch in patches:
        digest.update(patch.name.encode() + b"\0" + patch.change.encode() + b"\0")
    return digest.hexdigest()[:8]


def patched_tree(tree: Path, commit7: str, patches: list[Patch], cache: Path) -> Path:
    """`tree` with `patches` applied, made once under `cache`; EngineError with one line when a
    patch no longer applies (a llama.cpp update moved the code it changes)."""
    if not patches:
        return tree
    target = cache / f"llama.cpp-{commit7}-p{series_id(patches)}"
    if (target / ".lalo-patched").is_file():
        return target
    staging = cache / f".{target.name}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        touched = {path for patch in patches for path in patch.touched}
        # hard links for what no patch changes (fast, no space), copies for what they change
        shutil.copytree(tree, staging, symlinks=True, copy_function=_link_or_copy)
        for path in touched:
            file = staging / path
            if file.exists():
                data = file.read_bytes()
                file.unlink()
                file.write_bytes(data)
        for patch in patches:
            _apply(patch, staging)
        # the copy's `.git` file names a folder relative to the pristine tree: without it
        # cmake finds no git, and takes the commit written into the build info instead
        dotgit = staging / ".git"
        if dotgit.is_dir() and not dotgit.is_symlink():
            shutil.rmtree(dotgit)  # unlinks the links; the pristine tree keeps its files
        else:
            dotgit.unlink(missing_ok=True)
        stamp_commit(staging, commit7)
        (staging / ".lalo-patched").write_text("\n".join(p.name for p in patches) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _link_or_copy(source: str, dest: str) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _apply(patch: Patch, tree: Path) -> None:
    tool = shutil.which("patch")
    if tool is None:
        raise EngineError("the `patch` program is needed to apply lalo's llama.cpp patches "
                          "(apt-get install patch)")
    try:
        done = subprocess.run([tool, "-p1", "--forward", "--batch", "--no-backup-if-mismatch",
                               "-r", "-", "-d", str(tree)], input=patch.text, text=True,
                              capture_output=True, timeout=PATCH_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"applying {patch.name} failed: {exc}") from exc
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        why = next((line for marker in ("Reversed", "FAILED", "malformed") for line in lines
                    if marker in line), lines[-1] if lines else f"exit {done.returncode}")
        raise EngineError(f"lalo's patch {patch.name} no longer applies to this llama.cpp "
                          f"({why}); update the patch series in launcher/engines/patches/")
