"""`lalo up` on a first run: llama-server compiles while the models download, not after; a
failed build is reported once the pulls are done; Ctrl+C stops the compiler. The build and the
fetches are stand-ins that wait for each other on events (with deadlines), never on sleeps."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

from launcher.cli.up import UpRequest, prepare_up
from launcher.config import Config, LoadedConfig
from launcher.engines.background import BackgroundBuild, CancellableRunner
from launcher.engines.progress import ConsoleLines
from launcher.errors import EngineError

DEADLINE = 10.0  # seconds one side waits for the other before the test fails


@pytest.fixture(autouse=True)
def _no_env_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LALO_API_KEYS", raising=False)
    monkeypatch.delenv("LALO_CONFIG", raising=False)


class Spans:
    """When each stand-in started and ended (time.monotonic)."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.events = {name: threading.Event() for name in ("build", "fetch")}

    def begin(self, name: str) -> None:
        self.started[name] = time.monotonic()
        self.events[name].set()

    def wait_for(self, other: str) -> None:
        assert self.events[other].wait(DEADLINE), f"{other} did not start while this one ran"

    def end(self, name: str) -> None:
        self.ended[name] = time.monotonic()

    def overlap(self, a: str, b: str) -> bool:
        return self.started[a] < self.ended[b] and self.started[b] < self.ended[a]


def demo_config(tmp_path: Path) -> dict[str, Any]:
    return {"models": {"demo": {"file": str(tmp_path / "demo.gguf")}}}


def missing(config: Config, kinds: Collection[str] | None) -> bool:
    return True


def test_the_engine_builds_while_the_demo_model_downloads(tmp_path: Path) -> None:
    spans = Spans()

    def build(variant: str, runner: CancellableRunner) -> Path:
        spans.begin("build")
        spans.wait_for("fetch")
        spans.end("build")
        return tmp_path / "llama-server"

    def fetch(say: Any) -> dict[str, Any]:
        spans.begin("fetch")
        spans.wait_for("build")
        say("demo: SmolLM2-135M-Instruct cached")
        spans.end("fetch")
        return demo_config(tmp_path)

    out = io.StringIO()
    loaded, catalog = prepare_up(UpRequest(demo=True), ConsoleLines(out, interactive=False),
                                 build=build, fetch_demo=fetch, engine_missing=missing)
    assert spans.overlap("build", "fetch")
    assert loaded.config.models["demo"].file == str(tmp_path / "demo.gguf") and catalog is None
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("engine: no llama-server found: building it")
    assert lines[1] == "demo: SmolLM2-135M-Instruct cached"


def test_catalog_models_are_pulled_while_the_engine_builds(tmp_path: Path) -> None:
    config = tmp_path / "lalo.yaml"
    config.write_text("models:\n  chat:\n    catalog: smollm2-135m-instruct\n")
    spans = Spans()
    pulled: list[tuple[str, bool]] = []

    def build(variant: str, runner: CancellableRunner) -> Path:
        spans.begin("build")
        spans.wait_for("fetch")
        spans.end("build")
        return tmp_path / "llama-server"

    def pull(loaded: LoadedConfig, say: Any, lines_only: bool) -> None:
        spans.begin("fetch")
        spans.wait_for("build")
        pulled.extend((name, lines_only) for name in loaded.config.models)
        spans.end("fetch")

    prepare_up(UpRequest(config=config), ConsoleLines(io.StringIO(), interactive=False),
               build=build, pull=pull, engine_missing=missing)
    assert spans.overlap("build", "fetch")
    # progress as lines (no download bar drawn in place beside the build's status line)
    assert pulled == [("chat", True)]


def test_with_an_engine_found_nothing_is_built(tmp_path: Path) -> None:
    def build(variant: str, runner: CancellableRunner) -> Path:
        raise AssertionError("built although an engine was found")

    out = io.StringIO()
    prepare_up(UpRequest(demo=True), ConsoleLines(out, interactive=False), build=build,
               fetch_demo=lambda say: demo_config(tmp_path),
               engine_missing=lambda config, kinds: False)
    assert "engine:" not in out.getvalue()


def test_a_failed_build_is_reported_after_the_download_finished(tmp_path: Path) -> None:
    fetched = threading.Event()
    build_failed = threading.Event()

    def build(variant: str, runner: CancellableRunner) -> Path:
        build_failed.set()
        raise EngineError("llama.cpp build failed (`cmake` exit 2); last lines: ...")

    def fetch(say: Any) -> dict[str, Any]:
        assert build_failed.wait(DEADLINE)
        fetched.set()  # the download goes on to its end: the model is cached for next time
        return demo_config(tmp_path)

    with pytest.raises(EngineError, match=r"llama\.cpp build failed"):
        prepare_up(UpRequest(demo=True), ConsoleLines(io.StringIO(), interactive=False),
                   build=build, fetch_demo=fetch, engine_missing=missing)
    assert fetched.is_set()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")
def test_ctrl_c_while_downloading_stops_the_compiler(tmp_path: Path) -> None:
    compiling = threading.Event()
    pids: list[int] = []
    outcome: list[BaseException | int] = []

    def build(variant: str, runner: CancellableRunner) -> int:
        def on_line(line: str) -> None:
            pids.append(int(line))
            compiling.set()

        try:  # a stand-in compiler that would run for a minute
            code = runner(["sh", "-c", "echo $$; exec sleep 60"], cwd=tmp_path, on_line=on_line)
        except BaseException as exc:
            outcome.append(exc)
            raise
        outcome.append(code)
        return code

    def fetch(say: Any) -> dict[str, Any]:
        assert compiling.wait(DEADLINE)
        raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        prepare_up(UpRequest(demo=True), ConsoleLines(io.StringIO(), interactive=False),
                   build=build, fetch_demo=fetch, engine_missing=missing)
    assert time.monotonic() - started < 30
    assert outcome and outcome[0] != 0  # the compiler was stopped, not left to finish
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # stopped and reaped


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_while_waiting_for_the_build_lets_it_finish_cleaning_up(tmp_path: Path) -> None:
    """A Ctrl+C that interrupts the wait must still wait for the build's own cleanup (its
    progress line erased), not leave it to be killed at exit half-way."""
    compiling = threading.Event()
    finished: list[str] = []

    def work(runner: CancellableRunner) -> int:
        def on_line(line: str) -> None:
            compiling.set()

        try:
            return runner(["sh", "-c", "echo compiling; exec sleep 60"], cwd=tmp_path,
                          on_line=on_line)
        finally:
            # a cleanup that takes a moment, as the builder's does (log, lock, status line)
            subprocess.run(["sh", "-c", "sleep 0.5"], check=True)
            finished.append("cleaned up")

    build = BackgroundBuild(work).start()
    assert compiling.wait(30)
    # Ctrl+C while the main thread waits; raised inside the block wherever it lands (sent from
    # the build's thread, it could reach pytest itself before the wait began)
    with pytest.raises(KeyboardInterrupt):
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        build.wait()
    assert compiling.is_set()
    build.cancel()
    assert finished == ["cleaned up"]


CATALOG = """\
schema: 1
models:
  tiny-wheel-model:
    name: Tiny wheel model
    wheels: ["lalo-test-engine-overlap==1.0.0"]
    members: [lalo_test_engine_overlap/data/m.gguf]
    file: m.gguf
    file_type: Q4_K_M
    size: {size}
    size_exact: true
    sha256: {sha}
    license: {{id: MIT, source: "https://example.org/tiny"}}
    base_model: lalo/tiny
    purpose: tests
    context: 2048
    default_ctx: 2048
    architecture: {{name: llama, parameters: 1000, n_layer: 2, n_embd: 64, n_ff: 128, n_head: 2,
                   n_head_kv: 2, head_dim: 32, n_vocab: 256, n_ctx_train: 2048}}
"""


def test_catalog_pulls_beside_a_build_say_everything_in_lines_named_by_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real pip from a package index on this machine; every progress line goes through
    `say` (no bar drawn on the terminal beside the build's status line), named by the model."""
    from launcher.cli.up import pull_catalog_models
    from launcher.config import load_config
    from tests.support.wheel_index import serve_index, use_only_index

    data = b"GGUF" + bytes(range(256)) * 4000  # ~1 MiB: pip reports its download progress
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG.format(size=len(data), sha=hashlib.sha256(data).hexdigest()))
    monkeypatch.setenv("LALO_CATALOG", str(catalog))
    monkeypatch.setenv("LALO_CACHE_DIR", str(tmp_path / "cache"))
    config = tmp_path / "lalo.yaml"
    config.write_text("models:\n  chat:\n    catalog: tiny-wheel-model\n")
    said: list[str] = []
    with serve_index(tmp_path / "index") as index:
        index.publish("lalo-test-engine-overlap", "1.0.0", {"lalo_test_engine_overlap/data/m.gguf": data})
        use_only_index(monkeypatch, index.url)
        pull_catalog_models(load_config(config), said.append, True)
    assert said[0] == ("chat: tiny-wheel-model is not downloaded yet: pulling "
                       "wheels lalo-test-engine-overlap==1.0.0")
    assert all(line.startswith("chat: ") for line in said), said
    assert any(line.startswith("chat: m.gguf: ") and "100%" in line for line in said), said
