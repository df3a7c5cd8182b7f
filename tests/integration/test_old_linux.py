"""The packages on an older Linux: the bundle and the single binary, built with the portable
engine and a frozen lalo made in the Debian 11 build root, copied into a minimal Debian 11 root
(glibc 2.31, nothing installed beyond debootstrap's minbase) and started there through
`chroot` from an empty environment; each answers "What is the capital of France?" with the
real SmolLM2 model. Every ELF file they carry needs glibc 2.31 at most.

Needs root (debootstrap, chroot, unshare), and runs only when asked (LALO_TEST_OLD_LINUX=1)
or where the portable engine is already built in the root: the first run makes the roots (about 3 min), builds
the portable engine in one (15-25 min on 2 cores) and CPython 3.11 (about 5 min); all are
cached under lalo's cache by their inputs, so later runs only freeze lalo and copy.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from launcher import paths
from launcher.engines.buildroot import BuildRoot, ensure_root, glibc_required
from launcher.packaging.build import BuildResult, Packager
from launcher.packaging.spec import load_spec
from tests.support.engine import portable_in_root_built
from tests.support.lalo import free_port, wait_until

pytest.importorskip("PyInstaller", reason="pip install 'lalo-launcher[packaging]' for these")

OLDEST_GLIBC = (2, 31)  # Debian 11
START_TIMEOUT = 180.0
QUESTION = "What is the capital of France? Answer with one word."


def _why_not() -> str | None:
    if os.environ.get("LALO_TEST_OLD_LINUX") != "1" and not portable_in_root_built():
        return ("builds the Debian 11 root, the portable engine and CPython in it (20-30 min "
                "on 2 cores, more than CI's hour can spare): LALO_TEST_OLD_LINUX=1 to run it; "
                "it runs by itself where they are built")
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root: debootstrap, chroot and unshare make and enter the Debian 11 roots"
    for tool in ("debootstrap", "unshare", "chroot", "objdump"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install debootstrap util-linux binutils)"
    return None


pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.build,
    pytest.mark.skipif(_why_not() is not None, reason=_why_not() or ""),
    # a first run builds the portable engine and CPython in the build root
    pytest.mark.timeout(3 * 3600),
]


@dataclass(frozen=True)
class Built:
    result: BuildResult
    out: Path
    port: int


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Built:
    folder = tmp_path_factory.mktemp("old-linux")
    port = free_port()
    spec = folder / "smol.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "smol",
        "models": {"smol": {"file": str(smollm2), "license": "Apache-2.0", "ctx_size": 1024}},
        "targets": ["bundle", "exe"],
        "platforms": ["linux"],
        "proxy": {"port": port},
        "exe": {"models": "embed"},
        "engine": {"llama_server": {"variant": "portable"}},
    }, sort_keys=False))
    lines: list[str] = []
    os.environ["LALO_FREEZE_IN_ROOT"] = "1"  # this test is about the frozen lalo made there
    try:
        result = Packager(report=lines.append).build(load_spec(str(spec)), folder / "dist")
    except Exception:
        print("\n".join(lines))
        raise
    return Built(result, folder / "dist", port)


@pytest.fixture(scope="module")
def debian11() -> BuildRoot:
    """A minimal Debian 11: debootstrap's minbase and nothing else (cached)."""
    return ensure_root(paths.cache_dir(), packages=())


@pytest.fixture
def guest(debian11: BuildRoot) -> Iterator[tuple[BuildRoot, str]]:
    """A fresh folder inside the Debian 11 root, removed after the test."""
    inside = f"/tmp/lalo-{uuid.uuid4().hex[:8]}"
    debian11.host_path(inside).mkdir(parents=True)
    yield debian11, inside
    shutil.rmtree(debian11.host_path(inside), ignore_errors=True)


def _elf_files(folder: Path) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def _version(text: str | None) -> tuple[int, ...]:
    assert text is not None
    return tuple(int(p) for p in text.split("."))


class InRoot:
    """A command started in the Debian 11 root: its own mount and PID namespaces (/proc for
    psutil), chroot, `env -i` with only HOME and PATH; stopping it ends every process in it."""

    def __init__(self, root: BuildRoot, home: str, argv: list[str], log: Path) -> None:
        root.host_path(home).mkdir(parents=True)
        self.log = log
        command = ["unshare", "--mount", "--pid", "--fork", "--kill-child=SIGTERM",
                   f"--mount-proc={root.path / 'proc'}", "chroot", str(root.path),
                   "/usr/bin/env", "-i", f"HOME={home}", "PATH=/usr/bin:/bin", *argv]
        with log.open("w") as handle:
            self.proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # unshare passes SIGTERM to lalo
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _ask(port: int, proc: InRoot) -> str:
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"exited with {proc.proc.returncode}:\n{proc.output()}")
        try:
            status = httpx.get(f"{url}/api/status", timeout=2.0, trust_env=False).json()
        except httpx.HTTPError:
            return False
        return any(m["name"] == "smol" and m["state"] == "ready" for m in status["models"])

    wait_until(ready, START_TIMEOUT, message=f"smol ready at {url}")
    response = httpx.post(f"{url}/v1/chat/completions", timeout=120.0, trust_env=False, json={
        "model": "smol", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": QUESTION}],
    })
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_every_elf_file_needs_glibc_2_31_at_most(built: Built) -> None:
    assert built.result.bundle is not None and built.result.exe is not None
    bundle = built.result.bundle.directory
    files = _elf_files(bundle)
    assert bundle / "bin" / "llama-server" in files and bundle / "lalo" / "lalo" in files
    assert _version(glibc_required(files)) <= OLDEST_GLIBC
    assert _version(glibc_required([built.result.exe.path])) <= OLDEST_GLIBC
    # OpenMP and the C++ runtime travel with the engine, which needs no OpenSSL
    engine = [p for p in files if p.parent == bundle / "bin"]
    assert {"libgomp.so.1", "libstdc++.so.6"} <= {p.name for p in engine}
    needed = subprocess.run(["objdump", "-p", *map(str, engine)], capture_output=True,
                            text=True, check=True).stdout
    assert "libssl" not in needed and "libcrypto" not in needed


def test_bundle_start_answers_in_debian_11(built: Built, guest: tuple[BuildRoot, str],
                                           tmp_path: Path) -> None:
    root, inside = guest
    assert built.result.bundle is not None
    shutil.copytree(built.result.bundle.directory, root.host_path(f"{inside}/smol-bundle"),
                    symlinks=True, copy_function=os.link)
    proc = InRoot(root, f"{inside}/home", [f"{inside}/smol-bundle/start"], tmp_path / "run.log")
    try:
        assert "Paris" in _ask(built.port, proc)
    finally:
        proc.stop()


def test_single_binary_answers_in_debian_11(built: Built, guest: tuple[BuildRoot, str],
                                            tmp_path: Path) -> None:
    root, inside = guest
    assert built.result.exe is not None
    os.link(built.result.exe.path, root.host_path(f"{inside}/smol"))
    proc = InRoot(root, f"{inside}/home", [f"{inside}/smol"], tmp_path / "run.log")
    try:
        assert "Paris" in _ask(built.port, proc)
    finally:
        proc.stop()
