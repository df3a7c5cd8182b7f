"""llama.cpp source for `lalo engine build`: the pinned llama-cpp-python sdist (fetched once
with pip, cached under the user cache) or a checkout the user names, and its commit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher import paths
from launcher.errors import EngineError, HubError

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
SDIST_LABEL = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist"
# The sdist prepares its metadata in an isolated build env, which pip fills from PyPI: ~60 s.
DOWNLOAD_TIMEOUT = 1800.0
GIT_TIMEOUT = 30.0

# Files whose contents identify a tree that has no usable git metadata.
_KEY_FILES = (
    "CMakeLists.txt",
    "include/llama.h",
    "ggml/include/ggml.h",
    "ggml/CMakeLists.txt",
    "src/llama.cpp",
    "tools/server/server.cpp",
    "tools/server/CMakeLists.txt",
)


@dataclass(frozen=True)
class LlamaCppSource:
    """A llama.cpp tree ready to configure; `commit` is a full git sha or a tree hash."""

    tree: Path
    commit: str
    commit_origin: str  # "git" | "gitdir" | "tree-hash"
    label: str  # the sdist pin or the user's directory, recorded in the manifest

    @property
    def commit7(self) -> str:
        return self.commit[:7]


BUILD_INFO = "cmake/build-info.cmake"


def stamp_commit(tree: Path, commit: str) -> None:
    """Write `commit` into a tree's build info, for a copy in which cmake's git lookup cannot
    work (a build root has no git; a patched copy's `.git` file points nowhere), so that
    `llama-server --version` names it instead of "commit unknown". The file is written anew,
    never through a hard link to the pristine tree."""
    path = tree / BUILD_INFO
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    changed = text.replace('set(BUILD_COMMIT "unknown")', f'set(BUILD_COMMIT "{commit[:7]}")')
    if changed != text:
        path.unlink()
        path.write_text(changed, encoding="utf-8")


def sources_dir() -> Path:
    return paths.cache_dir() / "sources"


def check_tree(tree: Path) -> None:
    """Raise EngineError unless `tree` looks like a llama.cpp checkout with the server."""
    if not (tree / "CMakeLists.txt").is_file():
        raise EngineError(f"{tree}: not a llama.cpp source tree (no CMakeLists.txt)")
    if not (tree / "tools" / "server").is_dir():
        raise EngineError(f"{tree}: llama.cpp source without tools/server (too old?)")


def user_source(directory: Path) -> LlamaCppSource:
    """A checkout given with `--source DIR`."""
    tree = directory.expanduser().resolve()
    if not tree.is_dir():
        raise EngineError(f"{directory}: source directory does not exist")
    check_tree(tree)
    commit, origin = tree_commit(tree)
    return LlamaCppSource(tree=tree, commit=commit, commit_origin=origin, label=str(tree))


def pinned_source(
    *,
    cache: Path | None = None,
    progress: Callable[[str], None] | None = None,
    pip: Sequence[str] | None = None,
) -> LlamaCppSource:
    """The pinned sdist's `vendor/llama.cpp`, downloading and extracting it the first time
    (`pip`: the command that runs pip; default launcher.models.wheels.pip_command())."""
    root = cache if cache is not None else sources_dir()
    tree = extracted_sdist(root, progress=progress, pip=pip) / "vendor" / "llama.cpp"
    check_tree(tree)
    commit, origin = tree_commit(tree)
    return LlamaCppSource(tree=tree, commit=commit, commit_origin=origin, label=SDIST_LABEL)


def extracted_sdist(
    root: Path,
    *,
    progress: Callable[[str], None] | None = None,
    pip: Sequence[str] | None = None,
) -> Path:
    """`root/llama_cpp_python-X/`, made from `root/llama_cpp_python-X.tar.gz` once."""
    target = root / SDIST_NAME
    if target.is_dir():
        return target
    archive = root / f"{SDIST_NAME}.tar.gz"
    if not archive.is_file():
        download_sdist(archive, progress=progress, pip=pip)
    if progress is not None:
        progress(f"extracting {archive.name}")
    # Extract beside the target and rename: a half-extracted tree never has the final name.
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=root) as tmp:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                _extract_all(tar, Path(tmp))
        except (tarfile.TarError, OSError, EOFError) as exc:
            archive.unlink(missing_ok=True)  # a corrupt download is fetched again next time
            raise EngineError(f"{archive}: cannot extract: {exc}") from exc
        extracted = Path(tmp) / SDIST_NAME
        if not extracted.is_dir():
            raise EngineError(f"{archive}: has no {SDIST_NAME}/ directory")
        try:
            extracted.rename(target)
        except OSError:
            if not target.is_dir():  # a concurrent extraction may have won the race
                raise
    return target


def _extract_all(tar: tarfile.TarFile, dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    # Python < 3.11.4 has no extraction filters: refuse members that escape `dest`.
    base = dest.resolve()
    for member in tar.getmembers():
        target = (base / member.name).resolve()
        escapes = member.issym() and os.path.isabs(member.linkname)
        if escapes or not target.is_relative_to(base):
            raise EngineError(f"unsafe path in source archive: {member.name}")
    tar.extractall(dest)


def download_sdist(
    archive: Path,
    *,
    progress: Callable[[str], None] | None = None,
    pip: Sequence[str] | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> None:
    """`pip download` the pinned sdist into `archive` (atomically), with whichever pip
    pip_command() finds: a venv without pip (uv, `--without-pip`) can build the engine too."""
    if pip is None:
        pip = _pip_command()
    archive.parent.mkdir(parents=True, exist_ok=True)
    log_path = paths.cache_dir() / "logs" / "engine-source-download.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        progress(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} source with pip")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=archive.parent) as tmp:
        argv = [
            *pip, "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
            "-d", tmp,
        ]
        log.debug("running %s", argv)
        try:
            with log_path.open("w", encoding="utf-8") as out:
                done = subprocess.run(
                    argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    timeout=timeout, check=False,
                )
        except subprocess.TimeoutExpired as exc:
            raise EngineError(
                f"downloading the llama.cpp source timed out after {timeout:.0f} s; "
                f"log: {log_path}"
            ) from exc
        except OSError as exc:
            raise EngineError(f"cannot run {' '.join(pip)}: {exc}") from exc
        got = Path(tmp) / archive.name
        if done.returncode != 0 or not got.is_file():
            tail = _tail(log_path, 8)
            raise EngineError(
                f"pip could not download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} "
                f"(exit {done.returncode}); pass --source DIR with a llama.cpp checkout instead\n"
                f"{tail}\nfull log: {log_path}"
            )
        os.replace(got, archive)


def _pip_command() -> list[str]:
    from launcher.models.wheels import pip_command  # the model-pull module: imported only now

    try:
        return pip_command()
    except HubError as exc:  # no pip anywhere: say what it was for, and the way around it
        raise EngineError(f"cannot download the llama.cpp source: {exc}; or pass --source DIR "
                          "with a llama.cpp checkout") from exc


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def tree_commit(tree: Path) -> tuple[str, str]:
    """(commit, how it was found): git, else the gitdir's HEAD file, else a hash of key files."""
    if (tree / ".git").exists():
        commit = _git_head(tree)
        if commit is not None:
            return commit, "git"
        commit = _gitdir_head(tree)
        if commit is not None:
            return commit, "gitdir"
    return _tree_hash(tree), "tree-hash"


def _git_head(tree: Path) -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        done = subprocess.run(
            # safe.directory: a checkout owned by another user is still only read here.
            [git, "-c", "safe.directory=*", "-C", str(tree), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=GIT_TIMEOUT, check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and _is_sha(commit) else None


def _gitdir_head(tree: Path) -> str | None:
    """Read HEAD without git: `.git` is a directory or a `gitdir: PATH` file (submodules)."""
    dotgit = tree / ".git"
    try:
        if dotgit.is_file():
            line = dotgit.read_text(encoding="utf-8").strip()
            if not line.startswith("gitdir:"):
                return None
            gitdir = (tree / line.removeprefix("gitdir:").strip()).resolve()
        else:
            gitdir = dotgit
        head = (gitdir / "HEAD").read_text(encoding="utf-8").strip()
        if _is_sha(head):
            return head
        if not head.startswith("ref:"):
            return None
        ref = head.removeprefix("ref:").strip()
        ref_file = gitdir / ref
        if ref_file.is_file():
            value = ref_file.read_text(encoding="utf-8").strip()
            return value if _is_sha(value) else None
        packed = gitdir / "packed-refs"
        if packed.is_file():
            for entry in packed.read_text(encoding="utf-8").splitlines():
                sha, _, name = entry.partition(" ")
                if name == ref and _is_sha(sha):
                    return sha
    except OSError:
        return None
    return None


def _tree_hash(tree: Path) -> str:
    digest = hashlib.sha256()
    for name in _KEY_FILES:
        path = tree / name
        if path.is_file():
            digest.update(name.encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _is_sha(text: str) -> bool:
    return len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text)
