"""`lalo build` for real, with the real SmolLM2-135M-Instruct (and a generated model): the bundle
(portable llama-server + frozen lalo) and the single binary, each run in a clean environment
(empty HOME, PATH without the virtualenv, nothing else, and as root no network: a network
namespace with only loopback) and answering "What is the capital of France?" with Paris through
the proxy; two bundle builds give byte-identical archives.

PyInstaller runs here (about a minute per build on 2 cores, the one-folder lalo is cached).
The bundle carries the portable llama-server when one is built (`lalo engine build --variant
portable`, 20-45 minutes on 2 cores) or LALO_TEST_ENGINE_VARIANT=portable asks for it; otherwise
the native engine the other tests use, named as such in the spec (a CI run stays short).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import yaml

from launcher.config import parse_config
from launcher.engines.install import BuiltEngine
from launcher.packaging.build import BuildResult, Packager, cached_engine
from launcher.packaging.formats.payload import read_payload
from launcher.packaging.frozen import freeze
from launcher.packaging.frozen.freeze import frozen_app
from launcher.packaging.spec import load_spec
from tests.support.engine import test_engine_variant
from tests.support.lalo import free_port, wait_until
from tests.support.netns import in_namespace

pytest.importorskip("PyInstaller", reason="pip install 'lalo-launcher[packaging]' for these")


def _variant() -> str:
    # the engine the other tests run (portable where it can be built): one build in CI
    return test_engine_variant()


VARIANT = _variant()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    # building the portable engine takes long; freezing lalo a minute or two
    pytest.mark.timeout(4 * 3600 if VARIANT == "portable" else 1800),
]
START_TIMEOUT = 120.0
QUESTION = "What is the capital of France?"
# A network namespace of its own (only loopback, brought up) needs root; elsewhere the clean
# environment is all there is.
UNSHARE, IP = shutil.which("unshare"), shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
NO_NETWORK = os.geteuid() == 0 and UNSHARE is not None and IP is not None
T = TypeVar("T")


@dataclass(frozen=True)
class Built:
    spec: Path
    port: int
    result: BuildResult
    out: Path


def write_spec(folder: Path, smollm2: Path, small_model_b: Path, port: int,
               exe: str = "auto") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "tiny",
        "models": {
            "alpha": {"file": str(smollm2), "license": "Apache-2.0", "ctx_size": 512,
                      "aliases": ["a"]},
            "beta": {"file": str(small_model_b), "license": "Apache-2.0", "ctx_size": 512,
                     "preload": False},
        },
        "targets": ["bundle", "exe"],
        # no `platforms`: a Linux bundle must still need no Windows toolchain
        "proxy": {"port": port},
        "exe": {"models": exe},
        "engine": {"llama_server": {"variant": VARIANT}},
    }, sort_keys=False))
    return spec


def build(spec: Path, out: Path, targets: list[str] | None = None) -> BuildResult:
    lines: list[str] = []

    def engine(variant: str, report: Callable[[str], None], platform: str | None) -> BuiltEngine:
        ENGINE_PLATFORMS.append(platform)
        return cached_engine(variant, report, platform)

    packager = Packager(report=lines.append, engine_source=engine, app_source=frozen_app)
    try:
        return packager.build(load_spec(str(spec)), out, targets)  # type: ignore[arg-type]
    except Exception:
        print("\n".join(lines))
        raise


ENGINE_PLATFORMS: list[str | None] = []  # what every build here asked the engine cache for


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, smollm2: Path,
          small_model_b: Path) -> Built:
    folder = tmp_path_factory.mktemp("packaging")
    port = free_port()
    spec = write_spec(folder, smollm2, small_model_b, port)
    out = folder / "dist"
    return Built(spec, port, build(spec, out), out)


def clean_env(home: Path) -> dict[str, str]:
    """Only an empty HOME and the system PATH: no virtualenv, no lalo variables, no proxy."""
    home.mkdir(parents=True, exist_ok=True)
    assert not any(home.iterdir())
    return {"HOME": str(home), "PATH": "/usr/bin:/bin"}


def in_network_of(pid: int, call: Callable[[], T]) -> T:
    """`call()` with its sockets in process `pid`'s network namespace."""
    return in_namespace(f"/proc/{pid}/ns/net", call)


class Running:
    """A started `start` script or `lalo-ai`, stopped with `down` (or its group killed); with
    NO_NETWORK in a network namespace of its own where only loopback is up."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, port: int) -> None:
        self.argv, self.env, self.cwd = argv, env, cwd
        self.url = f"http://127.0.0.1:{port}"
        self.log = cwd / f"run-{port}.log"
        command = argv
        if NO_NETWORK:
            command = [str(UNSHARE), "--net", "--", "/bin/sh", "-c",
                       f'{IP} link set lo up && exec "$@"', "sh", *argv]
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def inside(self, call: Callable[[], T]) -> T:
        return in_network_of(self.proc.pid, call) if NO_NETWORK else call()

    def status(self) -> dict[str, object]:
        if self.proc.poll() is not None:
            raise AssertionError(f"exited with {self.proc.returncode}:\n{self.output()}")
        response = self.inside(lambda: httpx.get(self.url + "/api/status", timeout=2.0,
                                                 trust_env=False))
        response.raise_for_status()
        return dict(response.json())

    def wait_ready(self, model: str) -> None:
        def ready() -> bool:
            models = self.status()["models"]
            assert isinstance(models, list)
            return any(m["name"] == model and m["state"] == "ready" for m in models)

        wait_until(ready, START_TIMEOUT, message=f"{model} ready at {self.url}")
        if NO_NETWORK:  # what it ran in: loopback and nothing else
            links = subprocess.run(self._enter(["ip", "-o", "link"]), capture_output=True,
                                   text=True, timeout=30, check=True).stdout
            assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]

    def chat(self, model: str, question: str = "hello", max_tokens: int = 6,
             system: str | None = None) -> dict[str, object]:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": question})
        response = self.inside(lambda: httpx.post(
            self.url + "/v1/chat/completions", timeout=60.0, trust_env=False,
            json={"model": model, "max_tokens": max_tokens, "temperature": 0,
                  "messages": messages},
        ))
        assert response.status_code == 200, response.text
        return dict(response.json())

    def ask_paris(self, model: str) -> dict[str, object]:
        """The real model's answer to QUESTION, which names Paris."""
        reply = self.chat(model, QUESTION, max_tokens=24, system="You are a helpful assistant.")
        choices = reply["choices"]
        assert isinstance(choices, list)
        assert "Paris" in choices[0]["message"]["content"], reply
        return reply

    def _enter(self, argv: list[str]) -> list[str]:
        if not NO_NETWORK:
            return argv
        return [shutil.which("nsenter") or "nsenter", f"--net=/proc/{self.proc.pid}/ns/net", "--",
                *(str(IP) if arg == "ip" else arg for arg in argv)]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._enter([self.argv[0], *args]), env=self.env, cwd=self.cwd,
                              text=True, capture_output=True, timeout=120, check=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            done = self.cli("down")
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError(f"did not stop after `down`: {done.stderr}") from None
        elif _group_alive(self.proc.pid):  # lalo exited: leave no model server behind
            os.killpg(self.proc.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for item in started:
        item.stop()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the bundle ------------------------------------------------------------------------------


def test_bundle_holds_what_it_says(built: Built, smollm2: Path) -> None:
    bundle = built.out / "tiny-bundle"
    assert built.result.bundle is not None and built.result.bundle.directory == bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["engine"]["variant"] == VARIANT
    if VARIANT == "portable":
        assert "-DGGML_BACKEND_DL=ON" in manifest["engine"]["cmake_flags"]
    assert "libc.so.6" in manifest["engine"]["system_libraries"]
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*")
               if p.is_file() or p.is_symlink()} - {"manifest.json"}
    assert set(listed) == on_disk
    for rel, entry in listed.items():
        if "link" in entry:
            assert os.readlink(bundle / rel) == entry["link"]
        else:
            assert (bundle / rel).stat().st_size == entry["size"]
            assert sha256(bundle / rel) == entry["sha256"], rel
    assert {"bin/llama-server", "lalo/lalo", "start", "lalo.yaml", "NOTICE",
            f"models/{smollm2.name}", "models/small-b.gguf"} <= set(listed)
    if VARIANT == "portable":
        assert any(p.startswith("bin/libggml-cpu-") for p in listed)  # CPU variants beside it
    assert [m["name"] for m in manifest["models"]] == ["alpha", "beta"]
    # Nothing of the folder it was built from, so a frozen lalo cached by one checkout is the
    # one another would freeze: none of pip's bookkeeping (RECORD hashes console scripts, whose
    # shebang names the virtualenv) and no absolute path of the virtualenv or the checkout.
    app_files = [p for p in (bundle / "lalo").rglob("*") if p.is_file() and not p.is_symlink()]
    assert not [p for p in app_files if p.parent.suffix == ".dist-info"
                and p.name in {"RECORD", "REQUESTED", "direct_url.json"}]
    for path in app_files:
        data = path.read_bytes()
        for where in {sys.prefix, str(Path(__file__).resolve().parents[2])}:
            assert where.encode() not in data, (path, where)
    config = parse_config((bundle / "lalo.yaml").read_text(), label="bundle", total_ram=1 << 40)
    assert config.models["alpha"].file == f"models/{smollm2.name}"
    assert config.proxy.port == built.port
    notice = (bundle / "NOTICE").read_text()
    for name in ("llama.cpp", "cpp-httplib", "model alpha", "model beta", "CPython", "httpx",
                 "uvicorn", "pydantic", "PyInstaller bootloader"):
        assert name in notice, name
    for line in notice.splitlines():
        if line.strip().startswith("Licence text:"):
            for ref in line.split(":", 1)[1].split(","):
                assert (bundle / ref.strip()).is_file(), ref


def test_a_linux_bundle_from_a_spec_without_platforms_makes_nothing_for_windows(
    built: Built,
) -> None:
    """A spec without `platforms` (meaning linux, macos and windows) asked for bundle and exe:
    only this machine's engine is used, so no mingw-w64 toolchain is needed, and nothing for
    Windows is written (that is `--target windows`)."""
    assert ENGINE_PLATFORMS and set(ENGINE_PLATFORMS) == {None}, ENGINE_PLATFORMS
    assert not [p.name for p in built.out.iterdir() if "windows" in p.name or p.suffix == ".exe"]
    assert built.result.windows is None


def archive_differences(first: Path, second: Path) -> list[str]:
    """What differs between two archives, member by member (name, type, mode, owner, time,
    size, content): the message of a reproducibility failure."""
    def members(path: Path) -> dict[str, tuple[object, ...]]:
        found = {}
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m) if m.isfile() else None
                digest = hashlib.sha256(data.read()).hexdigest()[:16] if data else m.linkname
                found[m.name] = (m.type, oct(m.mode), m.uid, m.gid, m.mtime, m.size, digest)
        return found

    a, b = members(first), members(second)
    return [f"{name}: {a.get(name)} != {b.get(name)}"
            for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]


def freeze_elsewhere(tmp_path: Path) -> Path:
    """lalo frozen again by PyInstaller from a copy of its source at another path (another
    checkout; the path once changed PyInstaller's marshalled code, see stable_marshal.py), into
    a packaging folder of its own (the rest of the cache, build roots included, is shared)."""
    repo = Path(__file__).resolve().parents[2]
    source = tmp_path / "another_checkout_of_lalo"
    for part in ("launcher", "build"):
        shutil.copytree(repo / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    elsewhere = tmp_path / "packaging"
    script = ("import launcher; from pathlib import Path; from launcher.packaging.frozen import freeze; "
              f"assert launcher.__file__.startswith({str(source)!r}), launcher.__file__; "
              f"freeze.packaging_dir = lambda: Path({str(elsewhere)!r}); "
              "freeze.frozen_app(print, force=True)")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, text=True,
                          capture_output=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": str(source)})
    assert done.returncode == 0, done.stdout + done.stderr
    return elsewhere


def test_two_bundle_builds_give_byte_identical_archives(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # lalo frozen again from another checkout, not taken from the cache: the whole chain is
    # reproducible
    elsewhere = freeze_elsewhere(tmp_path)
    monkeypatch.setattr(freeze, "packaging_dir", lambda: elsewhere)
    assert frozen_app(lambda _: None).reused, "the app frozen elsewhere has another cache key"
    again = build(built.spec, tmp_path / "again", ["bundle"])
    assert again.bundle is not None and built.result.bundle is not None
    first, second = built.result.bundle.archive, again.bundle.archive
    assert first != second
    assert sha256(second) == again.bundle.archive_sha256
    assert sha256(first) == built.result.bundle.archive_sha256
    assert sha256(first) == sha256(second), archive_differences(first, second)
    with tarfile.open(second) as tar:
        names = tar.getnames()
        assert names == sorted(names) and names[0] == "tiny-bundle"
        assert {(m.uid, m.gid, m.mtime) for m in tar.getmembers()} == {(0, 0, 1577836800)}
        # Each module in marshal format 2: a code object (b"c") without the back-reference
        # flag (b"\xe3") that formats 3 and 4 set from the freezing process's reference counts
        base = tar.extractfile("tiny-bundle/lalo/_internal/base_library.zip")
        assert base is not None
        with zipfile.ZipFile(io.BytesIO(base.read())) as modules:
            kinds = {modules.read(name)[16:17] for name in modules.namelist()}
        assert kinds == {b"c"}, kinds


def test_bundle_start_script_answers_in_a_clean_environment(
    built: Built, tmp_path: Path, running: list[Running]
) -> None:
    # What a client does: unpack the archive anywhere and run ./start.
    assert built.result.bundle is not None
    with tarfile.open(built.result.bundle.archive) as tar:
        tar.extractall(tmp_path / "client", filter="tar")
    start = tmp_path / "client" / "tiny-bundle" / "start"
    env = clean_env(tmp_path / "home")
    server = Running([str(start)], env, tmp_path, built.port)
    running.append(server)
    server.wait_ready("alpha")
    assert server.ask_paris("a")["model"] == "alpha"
    usage = server.chat("a")["usage"]
    assert isinstance(usage, dict) and usage["completion_tokens"] == 6
    # beta loads on demand, from the same bundle
    assert server.chat("beta")["model"] == "beta"
    status = server.cli("status")
    assert status.returncode == 0 and "alpha" in status.stdout and "ready" in status.stdout
    assert "serving http://127.0.0.1:" in server.output()


# --- the single binary -----------------------------------------------------------------------


def test_exe_is_one_file_with_its_payload(built: Built, smollm2: Path) -> None:
    exe = built.result.exe
    assert exe is not None and exe.path == built.out / "tiny" and exe.models_mode == "embed"
    assert os.access(exe.path, os.X_OK)
    payload = read_payload(exe.path)
    assert payload is not None
    paths = {f["path"] for f in payload.files}
    assert {"engine/bin/llama-server", f"models/{smollm2.name}", "models/small-b.gguf"} <= paths
    notice = (built.out / "tiny.NOTICE").read_text()
    assert "PyInstaller bootloader" in notice and "model alpha" in notice
    assert (built.out / "tiny.LICENSES" / "llama.cpp" / "LICENSE").is_file()


def test_exe_answers_in_a_clean_environment(built: Built, tmp_path: Path, smollm2: Path,
                                            running: list[Running]) -> None:
    exe = built.out / "tiny"
    env = clean_env(tmp_path / "home")
    server = Running([str(exe)], env, tmp_path, built.port)  # no arguments: `lalo up`
    running.append(server)
    server.wait_ready("alpha")
    assert server.ask_paris("alpha")["model"] == "alpha"
    assert f"serving http://127.0.0.1:{built.port}" in server.output()  # the dashboard URL
    status = server.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert {m["name"] for m in json.loads(status.stdout)["models"]} == {"alpha", "beta"}
    # the payload went to lalo's cache under the (empty) HOME, once
    [unpacked] = (tmp_path / "home" / ".cache" / "lalo" / "payloads").iterdir()
    assert (unpacked / "models" / smollm2.name).is_file()


def test_exe_passes_arguments_to_lalos_cli(built: Built, tmp_path: Path,
                                           running: list[Running]) -> None:
    exe = built.out / "tiny"
    env = clean_env(tmp_path / "home")
    helped = subprocess.run([str(exe), "--help"], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert helped.returncode == 0 and "Usage: lalo" in helped.stdout
    for command in ("up", "status", "down", "plan"):
        assert command in helped.stdout
    assert not (tmp_path / "home" / ".cache" / "lalo" / "payloads").exists()  # --help: no unpacking
    port = free_port()
    server = Running([str(exe), "up", "--port", str(port)], env, tmp_path, port)
    running.append(server)
    server.wait_ready("alpha")
    assert server.chat("a")["model"] == "alpha"


def test_exe_with_models_beside_it(built: Built, tmp_path: Path, smollm2: Path,
                                   small_model_b: Path, running: list[Running]) -> None:
    port = free_port()
    spec = write_spec(tmp_path / "spec", smollm2, small_model_b, port, exe="beside")
    result = build(spec, tmp_path / "dist", ["exe"])
    assert result.exe is not None and result.exe.models_mode == "beside"
    assert result.exe.models_dir == tmp_path / "dist" / "tiny-models"
    assert sorted(p.name for p in result.exe.models_dir.iterdir()) == sorted(
        [smollm2.name, "small-b.gguf"])
    assert result.exe.size < built.result.exe.size  # type: ignore[union-attr]
    server = Running([str(result.exe.path)], clean_env(tmp_path / "home"), tmp_path, port)
    running.append(server)
    server.wait_ready("alpha")
    assert server.ask_paris("alpha")["model"] == "alpha"
