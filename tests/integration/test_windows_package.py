"""`lalo build SPEC --target windows` for real, run under wine as a Windows client would run it:
a two-model spec (the real SmolLM2-135M-Instruct and a random-weight model) gives NAME.exe and
NAME-setup.exe; NAME.exe unpacks once, serves both models on one port through llama.cpp's
router, answers "Paris", starts again without unpacking, and leaves no llama-server.exe behind
when it is killed; the installer installs per user, the installed NAME.exe serves both, and
the uninstaller leaves no model file behind.

Each test has a fresh wine prefix whose wineserver runs in a network namespace with only
loopback (as root): every socket a Windows program opens lives there, so nothing can reach a
network. The Windows engine (mingw-w64, about 10 minutes on 2 cores) is built once into lalo's
cache.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from launcher.packaging.formats.winpack import read_pack
from tests.support.lalo import free_port, wait_until
from tests.support.netns import LoopbackOnly, netns_available
from tests.support.real_models import real_model


def _why_not() -> str | None:
    for tool, package in (("wine", "wine wine64"), ("makensis", "nsis"),
                          ("x86_64-w64-mingw32-gcc-posix", "g++-mingw-w64-x86-64-posix")):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install {package}; scripts/test.sh installs it)"
    return None


pytestmark = [
    pytest.mark.integration,
    pytest.mark.build,
    pytest.mark.skipif(_why_not() is not None, reason=_why_not() or ""),
    pytest.mark.timeout(3600),
]
LALO = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "lalo"
SYSTEM = "You are a helpful assistant."
START_TIMEOUT = 240.0  # a fresh wine prefix and a busy 2-core machine


@dataclass(frozen=True)
class Package:
    exe: Path
    setup: Path
    folder: Path
    port: int
    build_output: str


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory, small_model: Path) -> Package:
    """The two-model spec built by `lalo build --target windows`, as a packager runs it."""
    work = tmp_path_factory.mktemp("windows-package")
    port = free_port()
    spec = work / "duo.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "duo",
        "proxy": {"port": port},
        "models": {
            "smol": {"file": str(real_model("smollm2-135m-instruct")), "license": "Apache-2.0",
                     "ctx_size": 1024, "aliases": ["smollm2"]},
            "noise": {"file": str(small_model), "license": "MIT", "ctx_size": 512},
        },
    }, sort_keys=False))
    lalo = str(LALO) if LALO.exists() else shutil.which("lalo") or "lalo"
    done = subprocess.run([lalo, "build", str(spec), "--target", "windows", "--out",
                           str(work / "dist")], capture_output=True, text=True, timeout=3600,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    dist = work / "dist"
    return Package(exe=dist / "duo.exe", setup=dist / "duo-setup.exe", folder=dist / "duo-windows",
                   port=port, build_output=done.stdout + done.stderr)


class Wine:
    """A fresh wine prefix whose wineserver (and so every socket of its programs) lives in a
    loopback-only network namespace; everything it ran is killed on close."""

    def __init__(self, prefix: Path) -> None:
        self.env = {**os.environ, "WINEPREFIX": str(prefix), "WINEDEBUG": "-all",
                    "WINEDLLOVERRIDES": "mscoree,mshtml="}  # no Mono/Gecko installer prompts
        self.netns = LoopbackOnly("lalo-wine") if netns_available() is None else None
        # a persistent wineserver started first: later wine commands join it (and its netns)
        self.server = subprocess.Popen(self._argv(["wineserver", "-f", "-p"]), env=self.env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(self._argv(["wineboot", "-i"]), env=self.env, capture_output=True,
                       timeout=300, check=False)

    def _argv(self, command: list[str]) -> list[str]:
        return self.netns.argv(command) if self.netns is not None else command

    def start(self, command: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as handle:
            return subprocess.Popen(self._argv(["wine", *command]), env=self.env, stdout=handle,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, command: list[str], timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._argv(["wine", *command]), env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def http(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        def call() -> httpx.Response:
            return httpx.request(method, url, trust_env=False, **kwargs)  # type: ignore[arg-type]

        return self.netns.call(call) if self.netns is not None else call()

    def windows_path(self, path: str) -> Path:
        """Where a `C:\\...` path of this prefix lies on Linux."""
        drive, rest = path.split(":", 1)
        assert drive.upper() == "C", path
        return Path(self.env["WINEPREFIX"]) / "drive_c" / rest.replace("\\", "/").lstrip("/")

    def close(self) -> None:
        subprocess.run(["wineserver", "-k"], env=self.env, capture_output=True, timeout=60,
                       check=False)
        self.server.kill()
        self.server.wait()
        if self.netns is not None:
            self.netns.close()


@pytest.fixture
def wine(tmp_path: Path) -> Iterator[Wine]:
    box = Wine(tmp_path / "prefix")
    yield box
    box.close()


def llama_servers() -> list[psutil.Process]:
    """Every llama-server.exe that wine runs on this machine."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "llama-server.exe" in cmdline:
            found.append(proc)
    return found


def wait_served(wine: Wine, proc: subprocess.Popen[bytes], log: Path, port: int) -> float:
    """Seconds until the router answers /health (proc must keep running)."""
    started = time.monotonic()

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            return wine.http("GET", f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, START_TIMEOUT, interval=0.2, message=f"health on port {port}")
    return time.monotonic() - started


def ask(wine: Wine, port: int, model: str, question: str) -> str:
    response = wine.http("POST", f"http://127.0.0.1:{port}/v1/chat/completions", timeout=300.0,
                         json={"model": model, "temperature": 0, "max_tokens": 24, "messages": [
                             {"role": "system", "content": SYSTEM},
                             {"role": "user", "content": question}]})
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def check_serves_both(wine: Wine, port: int) -> None:
    listed = wine.http("GET", f"http://127.0.0.1:{port}/v1/models", timeout=30.0).json()
    names = {m["id"] for m in listed["data"]}
    assert {"smol", "noise"} <= names, listed
    assert "Paris" in ask(wine, port, "smol", "What is the capital of France?")
    assert "Paris" in ask(wine, port, "smollm2", "What is the capital of France?")  # an alias
    assert ask(wine, port, "noise", "Say something.") is not None  # random weights: any text


def kill_and_check_no_orphans(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL of the Windows program (what a crash or Task Manager's End task does): the job
    object must take llama-server.exe and every model server with it."""
    assert llama_servers(), "no llama-server.exe ran"
    proc.kill()
    proc.wait()
    wait_until(lambda: not llama_servers(), 30.0, interval=0.2,
               message="no llama-server.exe left after NAME.exe was killed")


def test_build_outputs(package: Package) -> None:
    assert package.exe.is_file() and package.setup.is_file(), package.build_output
    assert package.exe.read_bytes()[:2] == b"MZ" and package.setup.read_bytes()[:2] == b"MZ"
    _, entries = read_pack(package.exe)
    paths = {e.path for e in entries}
    assert {"bin/llama-server.exe", "presets.ini", "lalo-launch.ini", "NOTICE"} <= paths
    assert sum(p.startswith("models/") for p in paths) == 2
    presets = (package.folder / "presets.ini").read_text()
    assert "[smol]" in presets and "alias = smollm2" in presets and "ctx-size = 1024" in presets
    launch = (package.folder / "lalo-launch.ini").read_text()
    assert "fits=1 " in launch and "fits=2 " in launch
    assert "llama.cpp" in (package.folder / "NOTICE").read_text()


def test_exe_unpacks_once_serves_both_and_leaves_nothing(package: Package, wine: Wine,
                                                          tmp_path: Path) -> None:
    first_log = tmp_path / "first.log"
    proc = wine.start([str(package.exe), "--port", str(package.port)], first_log)
    try:
        first = wait_served(wine, proc, first_log, package.port)
        check_serves_both(wine, package.port)
        output = first_log.read_text(errors="replace")
        assert "unpacking" in output and "at most 2 at once" in output, output
    finally:
        kill_and_check_no_orphans(proc)
    second_log = tmp_path / "second.log"
    proc = wine.start([str(package.exe), "--port", str(package.port)], second_log)
    try:
        second = wait_served(wine, proc, second_log, package.port)
        assert "unpacking" not in second_log.read_text(errors="replace")
        assert "Paris" in ask(wine, package.port, "smol", "What is the capital of France?")
    finally:
        kill_and_check_no_orphans(proc)
    # a damaged copy (a truncated model, as a full disk or a killed unpack leaves) is redone
    files = next(line.split(": ", 1)[1] for line in second_log.read_text().splitlines()
                 if line.strip().startswith("files: "))
    model = next(wine.windows_path(files.strip()).glob("models/*.gguf"))
    with model.open("r+b") as handle:
        handle.truncate(1000)
    third_log = tmp_path / "third.log"
    proc = wine.start([str(package.exe), "--port", str(package.port)], third_log)
    try:
        wait_served(wine, proc, third_log, package.port)
        assert "unpacking" in third_log.read_text(errors="replace")
        assert model.stat().st_size > 1000
    finally:
        kill_and_check_no_orphans(proc)
    print(f"windows exe under wine: first start to health {first:.1f} s (unpack), "
          f"second {second:.1f} s")


def test_exe_refuses_an_open_address_without_a_key_and_a_port_in_use(package: Package,
                                                                      wine: Wine) -> None:
    done = wine.run([str(package.exe), "--host", "0.0.0.0"], timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--api-key" in done.stdout

    def occupy() -> socket.socket:
        holder = socket.socket()
        holder.bind(("127.0.0.1", package.port))
        holder.listen()
        return holder

    holder = wine.netns.call(occupy) if wine.netns is not None else occupy()
    try:
        done = wine.run([str(package.exe), "--port", str(package.port)], timeout=300)
    finally:
        holder.close()
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot listen on 127.0.0.1:{package.port} (another program is using it)" in done.stdout
    assert not llama_servers()


def test_installer_installs_serves_and_uninstalls(package: Package, wine: Wine,
                                                  tmp_path: Path) -> None:
    target = "C:\\lalo-test\\duo"
    done = wine.run([str(package.setup), "/S", f"/D={target}"])
    assert done.returncode == 0, done.stdout + done.stderr
    installed = wine.windows_path(target)
    assert (installed / "duo.exe").is_file() and (installed / "Uninstall.exe").is_file()
    assert len(list((installed / "models").glob("*.gguf"))) == 2
    log = tmp_path / "installed.log"
    proc = wine.start([f"{target}\\duo.exe", "--port", str(package.port)], log)
    try:
        wait_served(wine, proc, log, package.port)
        check_serves_both(wine, package.port)
        assert "unpacking" not in log.read_text(errors="replace")  # runs where it lies
    finally:
        kill_and_check_no_orphans(proc)
    done = wine.run([f"{target}\\Uninstall.exe", "/S"])
    assert done.returncode == 0, done.stdout + done.stderr
    # the uninstaller copies itself to a temp folder and runs from there: wait for it
    wait_until(lambda: not (installed / "models").exists(), 60.0, interval=0.5,
               message="the uninstaller removed the models")
    left = [p for p in installed.rglob("*")] if installed.exists() else []
    assert not any(p.suffix == ".gguf" for p in left), left
    wait_until(lambda: not installed.exists(), 60.0, interval=0.5,
               message="the install folder removed")
