"""What goes where in lalo's OCI image (FROM scratch): the bundle folder at /app, the system
libraries its programs load (as `ldd` resolves them on the build machine) at their own paths,
a passwd entry for the non-root user, and writable folders for lalo's state and /tmp.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from launcher.errors import PackagingError

APP_DIR = "/app"
ENTRYPOINT = f"{APP_DIR}/lalo/lalo"
CONFIG_MOUNT = "/etc/lalo"  # the image's lalo.yaml; k8s mounts its ConfigMap here
STATE_ROOT = "/var/lib/lalo"  # lalo's state, cache and config dirs (an emptyDir in k8s)
HOME = "/home/lalo"
UID = GID = 65532  # the "nonroot" user of distroless images
USER_NAME = "lalo"
# glibc loads these with dlopen, so ldd does not list them: libgcc_s for thread cancellation
# (Python's threads at exit).
DLOPENED = ("libgcc_s.so.1",)
_LDD_LINE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def serve_arguments() -> list[str]:
    """The image's default command: `lalo up` on every interface of the container (its port
    mapping or Service decides who reaches it; see docs/deploy.md)."""
    return ["up", "--host", "0.0.0.0", "--insecure"]


def image_environment() -> dict[str, str]:
    return {
        "HOME": HOME,
        "LANG": "C.UTF-8",
        "LALO_CONFIG": f"{CONFIG_MOUNT}/lalo.yaml",
        "LALO_STATE_DIR": f"{STATE_ROOT}/state",
        "LALO_CACHE_DIR": f"{STATE_ROOT}/cache",
        "LALO_CONFIG_DIR": f"{STATE_ROOT}/config",
    }


def is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"\x7fELF"
    except OSError:
        return False


def elf_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and is_elf(p))


def system_libraries(binaries: Iterable[Path], inside: Path) -> list[Path]:
    """Every shared library (and the dynamic loader) the binaries load from outside `inside`,
    as the build machine's `ldd` resolves them; sorted."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise PackagingError("the image target needs ldd (Debian: libc-bin) to find libraries")
    found: set[Path] = set()
    root = inside.resolve()
    # a library shipped in the bundle but not on ldd's search path (the portable engine's CPU
    # variants load libggml-base.so from beside them at run time) is not missing
    shipped = {p.name for p in root.rglob("*")}
    for binary in binaries:
        done = subprocess.run([ldd, str(binary)], capture_output=True, text=True, timeout=60,
                              check=False, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            continue  # not a dynamic program ("not a dynamic executable"): nothing to add
        for line in done.stdout.splitlines():
            if "not found" in line:
                if line.split("=>", 1)[0].strip() in shipped:
                    continue
                raise PackagingError(f"{binary}: {line.strip()} on the build machine")
            match = _LDD_LINE.match(line)
            if match is None:
                continue
            path = Path(match.group(1))
            if not path.resolve().is_relative_to(root):
                found.add(path)
    for name in DLOPENED:
        for folder in {p.parent for p in found}:
            if (folder / name).exists():
                found.add(folder / name)
                break
    return sorted(found)


def write_system_root(root: Path, libraries: Iterable[Path]) -> None:
    """The image's files besides /app: libraries (contents, under the paths ldd names),
    /etc/passwd and /etc/group, and empty folders lalo needs."""
    for library in libraries:
        dest = root / str(library).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(library.resolve(), dest)
        dest.chmod(0o755)
    etc = root / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "passwd").write_text(
        f"root:x:0:0:root:/root:/sbin/nologin\n"
        f"{USER_NAME}:x:{UID}:{GID}:lalo:{HOME}:/sbin/nologin\n", encoding="utf-8")
    (etc / "group").write_text(f"root:x:0:\n{USER_NAME}:x:{GID}:\n", encoding="utf-8")
    for path in (etc / "passwd", etc / "group"):
        path.chmod(0o644)
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    os.chmod(tmp, 0o1777)


def owned_folders() -> list[str]:
    """Folders the non-root user writes (copied in with its uid)."""
    return [HOME, STATE_ROOT]
