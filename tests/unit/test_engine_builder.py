"""`lalo engine build/list` without compiling: naming, progress parsing, missing tools, manifests,
atomic install, source commits and engine lookup, with an injected command runner."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from launcher.cli.app import _register, app
from launcher.digest import file_sha256
from launcher.engines import buildroot, patch_series, root_build
from launcher.engines import source as sources
from launcher.engines.builder import EngineBuilder
from launcher.engines.cmake import (
    BUILDING,
    BuildProgress,
    DiskFullError,
    cmake_flags,
    parse_progress,
    relevant_tail,
    require_build_room,
    run_command,
)
from launcher.engines.progress import BuildProgressView, ConsoleLines
from launcher.engines.registry import (
    CONFIG_KEY,
    EngineManifest,
    ManifestFile,
    cached_engines,
    engine_key,
    find_llama_server,
    find_tool,
    list_engines,
    manifest_from_json,
    parse_version,
    platform_tag,
    read_manifest,
    require_llama_server,
    verify_engine,
)
from launcher.engines.toolchain import check_tools
from launcher.errors import EngineError

COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"

# Recorded from `cmake --build ... --target llama-server llama-quantize` (Makefile generator).
CMAKE_OUTPUT = """\
[  1%] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o
[  1%] Building CXX object ggml/src/CMakeFiles/ggml-base.dir/ggml.cpp.o
[  2%] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml-alloc.c.o
In file included from /src/ggml/src/ggml-cpu/ops.cpp:3:
/src/ggml/src/ggml-cpu/ops.cpp:123:5: warning: unused variable 'x' [-Wunused-variable]
[ 10%] Linking CXX shared library ../../bin/libggml-base.so
[ 10%] Built target ggml-base
[ 52%] Building CXX object src/CMakeFiles/llama.dir/llama-model.cpp.o
[  8%] Building CXX object tools/quantize/CMakeFiles/llama-quantize.dir/quantize.cpp.o
[100%] Linking CXX executable ../../bin/llama-server
[100%] Built target llama-server
""".splitlines()


def which_all(name: str) -> str | None:
    return f"/usr/bin/{name}"


class FakeCMake:
    """Stands in for cmake: answers configure, `--target help` and builds with files and lines."""

    def __init__(
        self,
        *,
        fail_build: int = 0,
        interrupt_build: bool = False,
        disk_full: bool = False,
        outputs: Sequence[str] = ("llama-server", "llama-quantize"),
    ) -> None:
        self.calls: list[list[str]] = []
        self.fail_build = fail_build
        self.interrupt_build = interrupt_build
        self.disk_full = disk_full
        self.outputs = outputs

    def __call__(
        self, argv: Sequence[str], *, cwd: Path, on_line: Callable[[str], None]
    ) -> int:
        argv = list(argv)
        self.calls.append(argv)
        if "-S" in argv:
            build = Path(argv[argv.index("-B") + 1])
            source = argv[argv.index("-S") + 1]
            (build / "CMakeCache.txt").write_text(f"CMAKE_HOME_DIRECTORY:INTERNAL={source}\n")
            on_line("-- Configuring done")
            return 0
        build = Path(argv[argv.index("--build") + 1])
        if argv[-1] == "help":
            for name in ("all (the default if no target is provided)", "ggml-cpu-x64",
                         "ggml-cpu-haswell", "llama-server"):
                on_line(f"... {name}")
            return 0
        for line in CMAKE_OUTPUT[:6]:
            on_line(line)
        if self.interrupt_build:
            raise KeyboardInterrupt
        if self.disk_full:  # what gcc prints when the disk fills under it
            (build / "half.o").write_bytes(b"\0" * 100)
            on_line("/src/ggml.c:1: fatal error: error writing to /tmp/ccX.s: "
                    "No space left on device")
            on_line("gmake[2]: *** [ggml/src/CMakeFiles/ggml-base.dir/build.make:76] Error 1")
            return 2
        if self.fail_build:
            on_line("/src/tools/server/server.cpp:10:1: error: 'foo' was not declared")
            on_line("gmake[2]: *** [tools/server/Makefile:76: server.cpp.o] Error 1")
            on_line("[ 60%] Building CXX object common/CMakeFiles/common.dir/arg.cpp.o")
            return self.fail_build
        bin_dir = build / "bin"
        bin_dir.mkdir(exist_ok=True)
        for name in self.outputs:
            write_exe(bin_dir / name, f"#!/bin/sh\necho 'version: 7 (0c1e570)' >&2\n# {name}\n")
        if "ggml-cpu-haswell" in argv:
            (bin_dir / "libggml.so.0.9.4").write_bytes(b"lib")
            (bin_dir / "libggml.so.0").symlink_to("libggml.so.0.9.4")
            (bin_dir / "libggml-cpu-haswell.so").write_bytes(b"haswell")
        for line in CMAKE_OUTPUT[6:]:
            on_line(line)
        return 0


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "llama.cpp"
    (root / "tools" / "server").mkdir(parents=True)
    (root / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    return root


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LALO_CACHE_DIR", str(root))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    return root


def make_builder(cache: Path, runner: FakeCMake, tree: Path) -> EngineBuilder:
    def fetch(note: Callable[[str], None]) -> sources.LlamaCppSource:
        note("pretend download")
        return sources.LlamaCppSource(tree, COMMIT, "git", sources.SDIST_LABEL)

    return EngineBuilder(
        engines_root=cache / "engines", cache_root=cache, runner=runner, which=which_all,
        fetch_pinned=fetch, compiler_probe=lambda cc: "cc (Fake) 12.2.0", use_build_root=False,
        patches=(),  # the fake tree has no llama.cpp to patch (test_patch_series_is_applied)
    )


# --- the patch series -----------------------------------------------------------------------

NEW_FILE_PATCH = """\
Subject: [PATCH] a marker
Upstream-Status: not for upstream
---
--- /dev/null
+++ b/tools/server/lalo-marker.txt
@@ -0,0 +1 @@
+patched by lalo
"""


def test_patch_series_is_applied_to_a_copy_and_named_in_key_and_manifest(
    cache: Path, tree: Path
) -> None:
    runner = FakeCMake()
    patches = [patch_series.Patch("0001-marker.patch", NEW_FILE_PATCH)]
    builder = make_builder(cache, runner, tree)
    builder.patches = patches
    built = builder.build("native", None)
    series = patch_series.series_id(patches)
    assert built.key == f"llama.cpp-0c1e570-p{series}-native-{platform_tag()}"
    assert built.manifest.extra["patches"] == ["0001-marker.patch"]
    assert built.manifest.extra["patches_id"] == series
    configured = next(argv for argv in runner.calls if "-S" in argv)
    patched = Path(configured[configured.index("-S") + 1])
    assert (patched / "tools" / "server" / "lalo-marker.txt").read_text() == "patched by lalo\n"
    assert not (tree / "tools" / "server" / "lalo-marker.txt").exists()  # the pinned tree
    # `lalo engine list` says which patches each engine carries
    _register()
    listed = CliRunner().invoke(app, ["engine", "list"], env={"PATH": ""})
    assert listed.exit_code == 0, listed.output
    assert "0001" in listed.stdout and "0001-marker.patch" in listed.stdout
    as_json = CliRunner().invoke(app, ["engine", "list", "--json"], env={"PATH": ""})
    assert json.loads(as_json.stdout)[0]["patches"] == ["0001-marker.patch"]
    # the same series again: already built; another series (or none): a new engine
    assert builder.build("native", None).already_built
    builder.patches = []
    assert not builder.build("native", None).already_built


# --- naming -------------------------------------------------------------------------------


def test_key_and_platform_naming() -> None:
    assert engine_key(COMMIT, "native", "linux-x86_64") == "llama.cpp-0c1e570-native-linux-x86_64"
    assert engine_key(COMMIT, "portable").startswith("llama.cpp-0c1e570-portable-")
    system, _, machine = platform_tag().partition("-")
    assert system in {"linux", "macos", "windows"} or system == sys.platform
    assert machine and machine != "amd64"
    with pytest.raises(EngineError, match="unknown engine variant 'fast'"):
        engine_key(COMMIT, "fast")


def test_flags_match_the_offline_recipe() -> None:
    native, portable = cmake_flags("native"), cmake_flags("portable")
    offline = ("-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DCMAKE_BUILD_TYPE=Release")
    for flag in offline:
        assert flag in native and flag in portable
    assert {"-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"} <= set(native)
    assert {"-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON",
            "-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON"} <= set(portable)


# --- progress and errors ------------------------------------------------------------------


def test_progress_parsed_from_recorded_cmake_output() -> None:
    parsed = [parse_progress(line) for line in CMAKE_OUTPUT]
    assert [p[0] if p else None for p in parsed] == [1, 1, 2, None, None, 10, 10, 52, 8, 100, 100]
    assert parsed[-1] == (100, "Built target llama-server")
    assert parse_progress("[12/48] Building CXX object src/llama.cpp.o") == (
        25, "Building CXX object src/llama.cpp.o"
    )
    assert parse_progress("-- Configuring done") is None


def test_progress_never_goes_backwards_and_printer_steps_by_five(
    cache: Path, tree: Path
) -> None:
    events: list[BuildProgress] = []
    make_builder(cache, FakeCMake(), tree).build("native", tree, progress=events.append)
    percents = [e.percent for e in events if e.stage == "build" and e.percent is not None]
    assert percents == sorted(percents) and percents[-1] == 100
    assert {e.stage for e in events} == {"configure", "build", "install"}

    out = io.StringIO()
    view = BuildProgressView(ConsoleLines(out, interactive=False), clock=lambda: 0.0)
    for event in events:
        view(event)
    lines = out.getvalue().splitlines()
    shown = [int(line[1:4]) for line in lines if line.startswith("[")]
    assert shown == [0, 10, 52, 100]
    assert lines[0] == f"configure: configuring {engine_key(tree_commit(tree), 'native')}"


def test_interactive_printer_rewrites_one_line() -> None:
    out = io.StringIO()
    view = BuildProgressView(ConsoleLines(out, interactive=True), clock=lambda: 0.0)
    view(BuildProgress("build", "Building a", 5))
    view(BuildProgress("build", "Building b", 6))
    view.close()
    assert "\n" not in out.getvalue()
    assert out.getvalue().count("\r\x1b[K") == 3


def test_relevant_tail_starts_at_first_error() -> None:
    lines = [f"[ {i}%] Building x{i}.o" for i in range(30)]
    lines[10:10] = ["src/a.cpp:1:2: error: boom", "  1 | int x = ;", "      ^"]
    assert relevant_tail(lines) == ["src/a.cpp:1:2: error: boom", "  1 | int x = ;", "      ^"]
    assert relevant_tail([f"line {i}" for i in range(40)])[0] == "line 25"


def test_failed_build_names_the_error_and_the_log(cache: Path, tree: Path) -> None:
    with pytest.raises(EngineError) as caught:
        make_builder(cache, FakeCMake(fail_build=2), tree).build("native", tree)
    message = str(caught.value)
    assert "llama.cpp build failed (`cmake` exit 2)" in message
    assert "error: 'foo' was not declared" in message
    assert "[ 60%]" not in message
    key = engine_key(tree_commit(tree), "native")
    log = cache / "logs" / f"engine-build-{key}.log"
    assert message.endswith(f"full log: {log}")
    assert "error: 'foo' was not declared" in log.read_text()
    assert [p.name for p in (cache / "engines").iterdir()] == [f".lock-{key}"]


def test_a_disk_that_fills_during_the_build_is_named_and_the_half_build_removed(
    cache: Path, tree: Path
) -> None:
    with pytest.raises(DiskFullError) as caught:
        make_builder(cache, FakeCMake(disk_full=True), tree).build("native", tree)
    message = str(caught.value)
    key = engine_key(tree_commit(tree), "native")
    assert message.startswith(f"the disk filled up during the llama.cpp build in {cache / 'build' / key}")
    assert "free there now" in message and "needs about 256 MiB" in message, message
    assert not (cache / "build" / key).exists()  # never resumed from half-written objects
    assert [p.name for p in (cache / "engines").iterdir()] == [f".lock-{key}"]


def test_a_build_killed_mid_write_has_what_it_wrote_made_again(cache: Path, tree: Path) -> None:
    # what kill -9 or a power cut leaves: the marker, an object written then (short or empty,
    # with a new time that make would trust), and an older object of an earlier, whole build
    key = engine_key(tree_commit(tree), "native")
    build = cache / "build" / key
    (build / "ggml").mkdir(parents=True)
    old = build / "ggml" / "old.o"
    old.write_bytes(b"whole")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    (build / BUILDING).touch()
    short = build / "ggml" / "short.o"
    short.write_bytes(b"")
    events: list[BuildProgress] = []
    make_builder(cache, FakeCMake(), tree).build("native", tree, progress=events.append)
    assert not short.exists() and old.read_bytes() == b"whole"
    assert any("did not finish (killed, or the power went): 1 file(s) it was writing removed"
               in e.message for e in events), [e.message for e in events]
    assert not (build / BUILDING).exists()  # this build ended by itself


def test_a_failed_build_leaves_no_unfinished_marker(cache: Path, tree: Path) -> None:
    with pytest.raises(EngineError):
        make_builder(cache, FakeCMake(fail_build=2), tree).build("native", tree)
    key = engine_key(tree_commit(tree), "native")
    assert not (cache / "build" / key / BUILDING).exists()  # make's tree is sound: kept


def test_a_build_without_room_is_refused_before_it_starts(tmp_path: Path) -> None:
    with pytest.raises(DiskFullError) as caught:
        require_build_room(tmp_path, "portable", free=100 * 1024**2)
    assert str(caught.value) == (
        f"not enough room to build llama.cpp (portable) in {tmp_path}: it needs about "
        "768 MiB, 100 MiB free there; free some space or set LALO_CACHE_DIR to a larger disk")
    require_build_room(tmp_path, "native", free=300 * 1024**2)  # enough: no error


@pytest.mark.parametrize(
    ("missing", "words"),
    [
        ("cmake", ["cmake", "apt-get install cmake"]),
        ("cc", ["C compiler", "gcc", "build-essential"]),
        ("c++", ["C++ compiler", "g++", "build-essential"]),
    ],
)
def test_missing_tool_named_with_its_package(
    missing: str, words: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    fallbacks = {"cc": "gcc", "c++": "g++"}

    def which(name: str) -> str | None:
        return None if name in (missing, fallbacks.get(missing)) else f"/usr/bin/{name}"

    with pytest.raises(EngineError) as caught:
        check_tools(which)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_missing_tool_checked_before_any_build(cache: Path, tree: Path) -> None:
    runner = FakeCMake()
    builder = make_builder(cache, runner, tree)
    builder.which = lambda name: None if name == "cmake" else "/usr/bin/x"
    with pytest.raises(EngineError, match="cmake"):
        builder.build("native", tree)
    assert runner.calls == []


def test_cc_and_cxx_environment_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "clang-17")
    monkeypatch.setenv("CXX", "clang++-17")
    seen: list[str] = []
    tools = check_tools(lambda name: seen.append(name) or f"/opt/{name}")
    assert tools == {"cmake": "/opt/cmake", "cc": "/opt/clang-17", "c++": "/opt/clang++-17"}


# --- install, manifest, idempotence -------------------------------------------------------


def test_build_installs_engine_with_valid_manifest(cache: Path, tree: Path) -> None:
    runner = FakeCMake()
    built = make_builder(cache, runner, tree).build("native", tree, jobs=3)
    key = engine_key(tree_commit(tree), "native")
    assert built.key == key and not built.already_built
    assert built.path == cache / "engines" / key
    assert built.server == built.path / "bin" / "llama-server"
    assert os.access(built.server, os.X_OK)
    assert (built.path / "bin" / "llama-quantize").is_file()
    assert built.log_path == cache / "logs" / f"engine-build-{key}.log"

    data = json.loads((built.path / "manifest.json").read_text())
    assert data["commit"] == tree_commit(tree) and data["commit_origin"] == "tree-hash"
    assert data["variant"] == "native" and data["platform"] == platform_tag()
    assert data["compiler"] == "cc (Fake) 12.2.0"
    assert "-DGGML_NATIVE=ON" in data["cmake_flags"]
    assert {f["path"] for f in data["files"]} == {"bin/llama-server", "bin/llama-quantize"}
    for entry in data["files"]:
        assert entry["sha256"] == file_sha256(built.path / entry["path"])
        assert entry["size"] == (built.path / entry["path"]).stat().st_size
    for field in ("build_seconds", "lalo_version", "built_at", "source"):
        assert field in data
    assert verify_engine(built.path).key == key

    build_argv = runner.calls[-1]
    assert build_argv[build_argv.index("--parallel") + 1] == "3"
    assert build_argv[build_argv.index("--target") + 1:] == ["llama-server", "llama-quantize"]
    # nothing but the engine and the lock left beside it
    assert sorted(p.name for p in (cache / "engines").iterdir()) == [f".lock-{key}", key]


def tree_commit(tree: Path) -> str:
    return sources.tree_commit(tree)[0]


def test_second_build_is_a_no_op(cache: Path, tree: Path) -> None:
    runner = FakeCMake()
    builder = make_builder(cache, runner, tree)
    first = builder.build("native", tree)
    calls = len(runner.calls)
    again = builder.build("native", tree)
    assert again.already_built and again.path == first.path and len(runner.calls) == calls

    forced = builder.build("native", tree, force=True)
    assert not forced.already_built and len(runner.calls) > calls
    assert read_manifest(forced.path).built_at >= first.manifest.built_at


def test_pinned_source_no_op_needs_neither_source_nor_cmake(cache: Path, tree: Path) -> None:
    runner = FakeCMake()
    builder = make_builder(cache, runner, tree)
    first = builder.build("native", None)
    assert first.manifest.source == sources.SDIST_LABEL
    assert first.key == engine_key(COMMIT, "native")

    def no_fetch(note: Callable[[str], None]) -> sources.LlamaCppSource:
        raise AssertionError("source fetched for an engine already built")

    builder.fetch_pinned = no_fetch
    builder.which = lambda name: None
    assert builder.build("native", None).already_built


def test_interrupted_build_leaves_nothing_installed(cache: Path, tree: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        make_builder(cache, FakeCMake(interrupt_build=True), tree).build("native", tree)
    engines = cache / "engines"
    assert [p.name for p in engines.iterdir() if not p.name.startswith(".lock-")] == []
    assert find_llama_server(engines_root=engines, which=lambda n: None) is None
    assert "# interrupted" in next((cache / "logs").iterdir()).read_text()


def test_failed_install_leaves_nothing_installed(cache: Path, tree: Path) -> None:
    runner = FakeCMake(outputs=("llama-server",))  # llama-quantize missing
    with pytest.raises(EngineError, match="produced no llama-quantize"):
        make_builder(cache, runner, tree).build("native", tree)
    assert [p.name for p in (cache / "engines").iterdir() if not p.name.startswith(".lock")] == []


def test_directory_without_valid_manifest_is_not_an_engine(cache: Path, tree: Path) -> None:
    built = make_builder(cache, FakeCMake(), tree).build("native", tree)
    engines = cache / "engines"
    half = engines / engine_key("1" * 40, "native")
    (half / "bin").mkdir(parents=True)
    write_exe(half / "bin" / "llama-server", "#!/bin/sh\n")
    assert [d for d, _ in cached_engines(engines)] == [built.path]

    (built.path / "bin" / "llama-quantize").write_text("truncated")
    with pytest.raises(EngineError, match="wrong size"):
        read_manifest(built.path)
    assert list(cached_engines(engines)) == []


def test_verify_detects_changed_bytes(cache: Path, tree: Path) -> None:
    built = make_builder(cache, FakeCMake(), tree).build("native", tree)
    server = built.server.read_bytes()
    built.server.write_bytes(server[:-1] + b"X")
    read_manifest(built.path)  # same size: the cheap check passes
    with pytest.raises(EngineError, match="bin/llama-server does not match its sha256"):
        verify_engine(built.path)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda d: d.pop("files"), "files: missing"),
        (lambda d: d.update(variant="fast"), "variant"),
        (lambda d: d.update(schema=99), "schema"),
        (lambda d: d["files"][0].update(sha256="xyz"), "bad sha256"),
        (lambda d: d["files"][0].update(path="../evil"), "bad path"),
        (lambda d: d.update(files=[d["files"][1]]), "no bin/llama-server"),
        (lambda d: d.update(build_seconds="fast"), "build_seconds"),
    ],
)
def test_manifest_validation(
    change: Callable[[dict[str, object]], object], error: str
) -> None:
    manifest = EngineManifest(
        key="k", commit=COMMIT, commit_origin="git", source="s", variant="native",
        platform="linux-x86_64", cmake_flags=("-DX=1",), compiler="cc", build_seconds=1.0,
        files=(ManifestFile("bin/llama-server", 3, "a" * 64),
               ManifestFile("bin/llama-quantize", 3, "b" * 64)),
        lalo_version="0", built_at="2026-01-01T00:00:00+00:00",
    )
    data = json.loads(json.dumps(manifest.to_json()))
    assert manifest_from_json(data) == manifest
    change(data)
    with pytest.raises(ValueError, match=error):
        manifest_from_json(data)


def test_portable_build_installs_cpu_variants_and_links(cache: Path, tree: Path) -> None:
    runner = FakeCMake()
    built = make_builder(cache, runner, tree).build("portable", tree)
    build_argv = runner.calls[-1]
    assert build_argv[build_argv.index("--target") + 1:] == [
        "llama-server", "llama-quantize", "ggml-cpu-haswell", "ggml-cpu-x64"
    ]
    files = {f.path: f for f in built.manifest.files}
    assert files["bin/libggml.so.0"].link == "libggml.so.0.9.4"
    assert files["bin/libggml-cpu-haswell.so"].size == len(b"haswell")
    assert (built.path / "bin" / "libggml.so.0").resolve() == built.path / "bin/libggml.so.0.9.4"
    assert built.key.split("-")[2] == "portable"


def test_build_tree_of_another_source_is_reconfigured(cache: Path, tree: Path) -> None:
    builder = make_builder(cache, FakeCMake(), tree)
    key = engine_key(tree_commit(tree), "native")
    stale = cache / "build" / key
    stale.mkdir(parents=True)
    (stale / "CMakeCache.txt").write_text("CMAKE_HOME_DIRECTORY:INTERNAL=/elsewhere\n")
    (stale / "old.o").write_text("")
    builder.build("native", tree)
    assert not (stale / "old.o").exists()


# --- the real runner ----------------------------------------------------------------------


@pytest.mark.skipif(os.name == "nt", reason="process groups")
def test_run_command_stops_the_child_group_when_interrupted(tmp_path: Path) -> None:
    pids: list[int] = []

    def on_line(line: str) -> None:
        pids.append(int(line))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_command(["sh", "-c", "sleep 60 & echo $!; wait"], cwd=tmp_path, on_line=on_line)
    grandchild = pids[0]
    # The child is reaped by run_command; the grandchild got the group's SIGTERM and is gone,
    # or a zombie where PID 1 does not reap orphans.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{grandchild}/status").read_text()
        except FileNotFoundError:
            return
        if "State:\tZ" in status:
            return
        time.sleep(0.05)
    pytest.fail(f"process {grandchild} still running after the build was interrupted")


def test_run_command_returns_exit_code_and_lines(tmp_path: Path) -> None:
    lines: list[str] = []
    code = run_command([sys.executable, "-c", "print('a'); print('b'); raise SystemExit(3)"],
                       cwd=tmp_path, on_line=lines.append)
    assert (code, lines) == (3, ["a", "b"])


# --- source -------------------------------------------------------------------------------


def test_commit_from_git_metadata_without_git(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    gitdir = tree.parent / "modules" / "llama.cpp"
    (gitdir / "refs" / "heads").mkdir(parents=True)
    (tree / ".git").write_text("gitdir: ../modules/llama.cpp\n")
    (gitdir / "HEAD").write_text(COMMIT + "\n")
    assert sources.tree_commit(tree) == (COMMIT, "gitdir")

    (gitdir / "HEAD").write_text("ref: refs/heads/master\n")
    (gitdir / "packed-refs").write_text(f"# pack-refs\n{'e' * 40} refs/heads/master\n")
    assert sources.tree_commit(tree) == ("e" * 40, "gitdir")
    (gitdir / "refs" / "heads" / "master").write_text("f" * 40 + "\n")
    assert sources.tree_commit(tree) == ("f" * 40, "gitdir")


def test_commit_falls_back_to_a_tree_hash(tree: Path) -> None:
    commit, origin = sources.tree_commit(tree)
    assert origin == "tree-hash" and len(commit) == 64
    (tree / "CMakeLists.txt").write_text("project(llama.cpp) # changed\n")
    assert sources.tree_commit(tree)[0] != commit


def test_user_source_must_be_a_llama_cpp_tree(tmp_path: Path, tree: Path) -> None:
    with pytest.raises(EngineError, match="does not exist"):
        sources.user_source(tmp_path / "nope")
    with pytest.raises(EngineError, match=r"no CMakeLists\.txt"):
        sources.user_source(tmp_path)
    assert sources.user_source(tree).tree == tree.resolve()


def make_sdist(archive: Path, tree_files: dict[str, str]) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in tree_files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{sources.SDIST_NAME}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_pinned_source_extracted_once_from_cached_archive(tmp_path: Path) -> None:
    root = tmp_path / "sources"
    make_sdist(root / f"{sources.SDIST_NAME}.tar.gz", {
        "vendor/llama.cpp/CMakeLists.txt": "project(llama.cpp)\n",
        "vendor/llama.cpp/tools/server/CMakeLists.txt": "",
    })
    notes: list[str] = []
    got = sources.pinned_source(cache=root, progress=notes.append, pip=["/nonexistent"])
    assert got.tree == root / sources.SDIST_NAME / "vendor" / "llama.cpp"
    assert got.label == sources.SDIST_LABEL and notes == [f"extracting {sources.SDIST_NAME}.tar.gz"]
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    notes.clear()
    assert sources.pinned_source(cache=root, progress=notes.append).tree == got.tree
    assert notes == []


def test_failed_download_says_how_to_build_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LALO_CACHE_DIR", str(tmp_path / "cache"))
    python = write_exe(
        tmp_path / "python", "#!/bin/sh\necho 'ERROR: No matching distribution'\nexit 1\n"
    )
    with pytest.raises(EngineError) as caught:
        sources.pinned_source(cache=tmp_path / "sources", pip=[str(python)])
    message = str(caught.value)
    assert "pip could not download llama-cpp-python==0.3.36 (exit 1)" in message
    assert "--source DIR" in message and "No matching distribution" in message
    assert not (tmp_path / "sources" / f"{sources.SDIST_NAME}.tar.gz").exists()


# --- registry -----------------------------------------------------------------------------


def install_fake(cache: Path, tree: Path, variant: str) -> Path:
    return make_builder(cache, FakeCMake(), tree).build(variant, tree).server


def test_lookup_order_config_then_cache_then_path(
    cache: Path, tree: Path, tmp_path: Path
) -> None:
    engines = cache / "engines"
    on_path = write_exe(tmp_path / "llama-server", "#!/bin/sh\necho 'version: 9 (abcdef1)' >&2\n")

    def which(name: str) -> str | None:
        return str(on_path)

    found = find_llama_server(engines_root=engines, which=which)
    assert found is not None and found.origin == "PATH"
    assert (found.version, found.commit, found.variant) == ("9 (abcdef1)", "abcdef1", None)

    portable = install_fake(cache, tree, "portable")
    found = find_llama_server(variant="native", engines_root=engines, which=which)
    assert found is not None and (found.origin, found.path) == ("cache", portable)
    native = install_fake(cache, tree, "native")
    found = find_llama_server(variant="native", engines_root=engines, which=which)
    assert found is not None and found.path == native and found.variant == "native"
    assert found.version == "7 (0c1e570)"
    assert found.manifest == native.parent.parent / "manifest.json"
    found = find_llama_server(variant="portable", engines_root=engines, which=which)
    assert found is not None and found.path == portable

    found = find_llama_server(str(on_path), engines_root=engines, which=which)
    assert found is not None and (found.origin, found.path) == ("config", on_path)

    assert [e.origin for e in list_engines(engines_root=engines, which=which)] == [
        "cache", "cache", "PATH"
    ]
    listed = list_engines(str(on_path), engines_root=engines, which=which)
    assert [e.origin for e in listed] == ["config", "cache", "cache"]  # PATH is the same file


def test_version_output_parsed_in_both_formats() -> None:
    assert parse_version(
        "load_backend: loaded CPU backend from ./libggml-cpu-haswell.so\n"
        "version: 0.5.0-dev (build 1, commit 0c1e570)\nbuilt with GNU 12.2.0 for Linux x86_64\n"
    ) == ("0.5.0-dev (build 1, commit 0c1e570)", "0c1e570")
    assert parse_version("version: 4589 (0c1e570)\n") == ("4589 (0c1e570)", "0c1e570")
    assert parse_version("version: 0.5.0-dev (build 1, commit unknown)") == (
        "0.5.0-dev (build 1, commit unknown)", None
    )
    assert parse_version("usage: llama-server [options]") is None


def test_configured_path_missing_names_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=f"^{CONFIG_KEY}: .*/missing does not exist$"):
        find_llama_server(str(tmp_path / "missing"))


def test_nothing_found(tmp_path: Path) -> None:
    assert find_llama_server(engines_root=tmp_path, which=lambda n: None) is None
    with pytest.raises(EngineError, match=r"no llama-server found; run `lalo engine build`"):
        require_llama_server(engines_root=tmp_path, which=lambda n: None)


def test_find_tool_beside_the_server(cache: Path, tree: Path) -> None:
    install_fake(cache, tree, "native")
    engine = require_llama_server(engines_root=cache / "engines", which=lambda n: None)
    assert find_tool(engine, "llama-quantize") == engine.path.parent / "llama-quantize"
    assert find_tool(engine, "llama-bench") is None


# --- CLI ----------------------------------------------------------------------------------


def test_cli_list_json_and_table(cache: Path, tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = install_fake(cache, tree, "native")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.chdir(tree)
    monkeypatch.setenv("LALO_CONFIG_DIR", str(cache / "config"))
    monkeypatch.delenv("LALO_CONFIG", raising=False)
    _register()
    runner = CliRunner()
    result = runner.invoke(app, ["engine", "list", "--json"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)
    assert entry["path"] == str(server) and entry["selected"] and entry["origin"] == "cache"
    result = runner.invoke(app, ["engine", "list"])
    assert result.exit_code == 0
    assert result.stdout.splitlines()[1].startswith("*  built here  native")


def test_cli_build_when_already_built_says_so(cache: Path, tree: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(patch_series, "series", lambda: [])  # the fake tree takes no patches
    built = make_builder(cache, FakeCMake(), tree).build("native", None)
    _register()
    result = CliRunner().invoke(app, ["engine", "build", "--variant", "native"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"already built: {built.server}\n"
    result = CliRunner().invoke(app, ["engine", "build", "--variant", "fast"])
    assert result.exit_code == 2


# --- the cuda variant (configure and manifest only: no CUDA build runs in the unit tests) ------


def test_cuda_flags_name_the_plan_tiers_architectures_or_the_narrowed_list() -> None:
    from launcher.engines.toolchain import CUDA_ARCHITECTURES, cuda_architectures

    flags = cmake_flags("cuda")
    assert "-DGGML_CUDA=ON" in flags and "-DGGML_NATIVE=ON" in flags
    assert "-DCMAKE_CUDA_ARCHITECTURES=80;86;89;90" in flags
    assert CUDA_ARCHITECTURES == ("80", "86", "89", "90")
    assert "-DCMAKE_CUDA_ARCHITECTURES=89" in cmake_flags("cuda", ["89"])
    assert cuda_architectures(["8.9", "sm_90,80", "89"]) == ("89", "90", "80")
    assert cuda_architectures(["90a", "120-real"]) == ("90a", "120-real")
    with pytest.raises(EngineError, match="--cuda-arch: 'ada' is not a CUDA architecture"):
        cuda_architectures(["ada"])
    with pytest.raises(EngineError, match="use native, portable or cuda"):
        cmake_flags("rocm")


def test_cuda_build_without_nvcc_is_one_line(cache: Path, tree: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDACXX", raising=False)
    runner = FakeCMake()
    builder = EngineBuilder(engines_root=cache / "engines", cache_root=cache, runner=runner,
                            which=lambda name: None if name == "nvcc" else f"/usr/bin/{name}")
    with pytest.raises(EngineError) as caught:
        builder.build("cuda", tree)
    assert str(caught.value) == ("the cuda variant needs the CUDA toolkit: nvcc not found on PATH "
                                 "(install CUDA 12 or 13, or set CUDACXX to its nvcc)")
    assert runner.calls == []
    with pytest.raises(EngineError, match="--cuda-arch is for --variant cuda"):
        builder.build("native", tree, cuda_archs=["89"])


def test_cuda_build_configures_with_nvcc_and_records_cuda_in_the_manifest(
        cache: Path, tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDACXX", raising=False)
    runner = FakeCMake()
    builder = EngineBuilder(
        engines_root=cache / "engines", cache_root=cache, runner=runner, which=which_all,
        compiler_probe=lambda cc: "cc (Fake) 12.2.0", nvcc_probe=lambda nvcc: "13.0.88",
        cuda_check=lambda nvcc: None)
    built = builder.build("cuda", tree, cuda_archs=["89"])
    configure = runner.calls[0]
    assert "-DGGML_CUDA=ON" in configure and "-DCMAKE_CUDA_ARCHITECTURES=89" in configure
    assert configure[-1] == "-DCMAKE_CUDA_COMPILER=/usr/bin/nvcc"
    assert built.key.startswith("llama.cpp-") and "-cuda-" in built.key
    data = json.loads((built.path / "manifest.json").read_text())
    assert data["variant"] == "cuda"
    assert data["cuda"] == "13.0.88" and data["cuda_architectures"] == ["89"]
    # the same architectures again: cached; others: rebuilt in place
    assert builder.build("cuda", tree, cuda_archs=["89"]).already_built
    again = builder.build("cuda", tree, cuda_archs=["80", "90"])
    assert not again.already_built
    assert json.loads((again.path / "manifest.json").read_text())["cuda_architectures"] == ["80", "90"]


def test_nvcc_version_is_read_from_its_release_line(tmp_path: Path) -> None:
    from launcher.engines.toolchain import nvcc_version

    fake = tmp_path / "nvcc"
    write_exe(fake, "#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    "echo 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    assert nvcc_version(str(fake)) == "13.0.88"


def test_a_toolkit_without_cublas_is_one_line_before_cmake(tmp_path: Path) -> None:
    """This machine's CUDA 13.0 has nvcc and cudart but no cuBLAS: cmake configured, then
    failed generating (`Target "ggml-cuda" links to: CUDA::cublas but the target was not found`)."""
    from launcher.engines.toolchain import check_cuda_libraries

    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    write_exe(toolkit / "bin" / "nvcc", "#!/bin/sh\n")
    with pytest.raises(EngineError,
                       match=r"needs cuBLAS, which the CUDA toolkit of .*cuda-13.0/bin/nvcc lacks"):
        check_cuda_libraries(str(toolkit / "bin" / "nvcc"), extra_roots=[tmp_path / "none"])
    (toolkit / "targets" / "x86_64-linux" / "include").mkdir(parents=True)
    (toolkit / "targets" / "x86_64-linux" / "include" / "cublas_v2.h").write_text("")
    check_cuda_libraries(str(toolkit / "bin" / "nvcc"), extra_roots=[])


# --- the portable engine in an old-glibc root, the Windows engine (fake cmake) -------------


class InRoot:
    """Unwraps `chroot ROOT env -i K=V... argv` and maps the root's paths to this machine's,
    so FakeCMake can stand in for the cmake inside the root; records the environment."""

    def __init__(self, root: Path, cmake: FakeCMake) -> None:
        self.root = root
        self.cmake = cmake
        self.envs: list[list[str]] = []

    def __call__(self, argv: Sequence[str], *, cwd: Path, on_line: Callable[[str], None]) -> int:
        argv = list(argv)
        assert argv[:4] == ["chroot", str(self.root), "/usr/bin/env", "-i"], argv
        rest = argv[4:]
        env = [a for a in rest if "=" in a and not a.startswith("-")][:3]
        self.envs.append(env)
        inner = rest[len(env):]
        mapped = [str(self.root / a.lstrip("/")) if a.startswith("/lalo/") else a for a in inner]
        return self.cmake(mapped, cwd=cwd, on_line=on_line)


def fake_root(tmp_path: Path) -> buildroot.BuildRoot:
    path = tmp_path / "bullseye"
    for tool in ("cmake", "gcc", "g++"):
        write_exe(path / "usr" / "bin" / tool if (path / "usr" / "bin").is_dir()
                  else _mkdirs(path / "usr" / "bin") / tool, "#!/bin/sh\n")
    libs = _mkdirs(path / "usr" / "lib" / "x86_64-linux-gnu")
    (libs / "libgomp.so.1.0.0").write_bytes(b"gomp")
    (libs / "libgomp.so.1").symlink_to("libgomp.so.1.0.0")
    (libs / "libstdc++.so.6.0.28").write_bytes(b"stdc++")
    # an absolute link: followed inside the root, not on this machine
    (libs / "libstdc++.so.6").symlink_to("/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.28")
    (libs / "libgcc_s.so.1").write_bytes(b"gcc_s")
    return buildroot.BuildRoot(path=path, suite="bullseye", packages=())


def _mkdirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_portable_engine_is_built_in_the_old_root_and_carries_the_gcc_runtime(
    cache: Path, tree: Path, tmp_path: Path
) -> None:
    (tree / "ggml" / "src").mkdir(parents=True)
    (tree / "cmake").mkdir()
    (tree / "cmake" / "build-info.cmake").write_text('set(BUILD_NUMBER 0)\nset(BUILD_COMMIT "unknown")\n')
    (tree / "ggml" / "src" / "CMakeLists.txt").write_text(
        "        ggml_add_cpu_backend_variant(haswell            SSE42 AVX2)\n"
        "        ggml_add_cpu_backend_variant(alderlake          SSE42 AVX_VNNI)\n"
        "            ggml_add_cpu_backend_variant(sapphirerapids AMX_TILE AMX_INT8)\n")
    root = fake_root(tmp_path)
    runner = InRoot(root.path, FakeCMake())
    builder = EngineBuilder(
        engines_root=cache / "engines", cache_root=cache, runner=runner, which=which_all,
        fetch_pinned=lambda note: sources.LlamaCppSource(tree, COMMIT, "git", sources.SDIST_LABEL),
        compiler_probe=lambda cc: "gcc (Debian 10.2.1-6) 10.2.1 20210110",
        build_root=lambda note: root, use_build_root=True, patches=(),
    )
    built = builder.build("portable")
    # Everything ran inside the root, from a clean environment, on the root's copy.
    assert all(env[0].startswith("PATH=") for env in runner.envs)
    configure = runner.cmake.calls[0]
    assert configure[configure.index("-S") + 1] == str(root.path / f"lalo/src/llama.cpp-{COMMIT}")
    info = root.path / f"lalo/src/llama.cpp-{COMMIT}/cmake/build-info.cmake"
    assert 'set(BUILD_COMMIT "0c1e570")' in info.read_text()
    copied = (root.path / f"lalo/src/llama.cpp-{COMMIT}/ggml/src/CMakeLists.txt").read_text()
    assert "# lalo: left out, gcc < 11: ggml_add_cpu_backend_variant(alderlake" in copied
    assert "# lalo: left out, gcc < 11: ggml_add_cpu_backend_variant(sapphirerapids" in copied
    assert copied.startswith("        ggml_add_cpu_backend_variant(haswell")
    assert "-DLLAMA_OPENSSL=OFF" in built.manifest.cmake_flags
    files = {f.path: f for f in built.manifest.files}
    for name, data in (("libgomp.so.1", b"gomp"), ("libstdc++.so.6", b"stdc++"),
                       ("libgcc_s.so.1", b"gcc_s")):
        assert (built.path / "bin" / name).read_bytes() == data and files[f"bin/{name}"].link is None
    assert built.manifest.extra["build_root"] == "debian-bullseye"
    assert built.manifest.extra["cpu_variants_left_out"] == ["alderlake", "sapphirerapids"]
    # A second build is a no-op; one built on this machine (no root) is not taken for it.
    assert builder.build("portable").already_built
    host_built = make_builder(cache, FakeCMake(), tree).build("portable", force=True)
    assert "build_root" not in host_built.manifest.extra
    assert not builder.build("portable").already_built


def test_windows_engine_cross_compiles_one_static_exe(cache: Path, tree: Path) -> None:
    runner = FakeCMake(outputs=("llama-server.exe",))
    builder = make_builder(cache, runner, tree)
    built = builder.build("portable", platform_name="windows")
    assert built.key == f"llama.cpp-{COMMIT[:7]}-portable-windows-x86_64"
    assert built.server == built.path / "bin" / "llama-server.exe"
    assert [f.path for f in built.manifest.files] == ["bin/llama-server.exe"]
    configure = runner.calls[0]
    toolchain = next(a for a in configure if a.startswith("-DCMAKE_TOOLCHAIN_FILE="))
    text = Path(toolchain.partition("=")[2]).read_text()
    assert "CMAKE_SYSTEM_NAME Windows" in text and "-static-libstdc++" in text
    assert "x86_64-w64-mingw32-g++-posix" in text
    assert {"-DGGML_OPENMP=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=OFF"} <= set(configure)
    build = runner.calls[-1]
    assert build[build.index("--target") + 1:] == ["llama-server"]
    # Not an engine this machine runs: the registry does not offer it here.
    assert all(m.platform == platform_tag() for _, m in cached_engines(cache / "engines"))
    assert builder.build("portable", platform_name="windows").already_built
    with pytest.raises(EngineError, match="portable variant only"):
        builder.build("native", platform_name="windows")
    with pytest.raises(EngineError, match="use host or windows"):
        builder.build("portable", platform_name="beos")


def test_windows_build_without_mingw_names_the_package(cache: Path, tree: Path) -> None:
    builder = EngineBuilder(
        engines_root=cache / "engines", cache_root=cache, runner=FakeCMake(),
        which=lambda name: None if "mingw32" in name else f"/usr/bin/{name}",
        fetch_pinned=lambda note: sources.LlamaCppSource(tree, COMMIT, "git", sources.SDIST_LABEL),
    )
    with pytest.raises(EngineError, match="apt-get install gcc-mingw-w64-x86-64-posix"):
        builder.build("portable", platform_name="windows")


def test_debian_mirror_read_from_apt_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    assert buildroot.debian_mirror(tmp_path) == buildroot.DEFAULT_MIRROR
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n")
    assert buildroot.debian_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://other.example/debian bookworm main\n")
    assert buildroot.debian_mirror(tmp_path) == "http://other.example/debian"


def test_gcc_major_and_variants_it_cannot_build() -> None:
    assert root_build.gcc_major("gcc (Debian 10.2.1-6) 10.2.1 20210110") == 10
    assert root_build.unbuildable_variants("gcc (Debian 10.2.1-6) 10.2.1 20210110") == [
        "alderlake", "sapphirerapids"]
    assert root_build.unbuildable_variants("gcc (Debian 12.2.0-14) 12.2.0") == []
    assert root_build.unbuildable_variants("clang version 16.0.6") == []


def test_leaving_out_variants_is_idempotent() -> None:
    text = "  ggml_add_cpu_backend_variant(alderlake  AVX_VNNI)\n"
    once = root_build.leave_out_variants(text, ["alderlake"])
    assert once == "  # lalo: left out, gcc < 11: ggml_add_cpu_backend_variant(alderlake  AVX_VNNI)\n"
    assert root_build.leave_out_variants(once, ["alderlake"]) == once
    assert root_build.leave_out_variants(text, []) == text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF symbol versions: Linux")
def test_glibc_required_reads_symbol_versions(tmp_path: Path) -> None:
    import shutil

    if shutil.which("objdump") is None:
        pytest.skip("needs objdump (binutils)")
    needed = buildroot.glibc_required([Path("/bin/ls")])
    assert needed is not None and needed.startswith("2.")
    (tmp_path / "text").write_text("not an ELF file")
    assert buildroot.glibc_required([tmp_path / "text"]) is None


def test_a_new_build_root_removes_the_roots_unused_for_two_weeks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "buildroots"
    month_ago = time.time() - 30 * 86400

    def root(name: str, complete: bool = True, idle: bool = True) -> Path:
        path = _mkdirs(folder / name / "usr" / "bin").parent.parent
        if complete:
            (path / buildroot.READY).write_text("pkgs\n")
            if idle:
                os.utime(path / buildroot.READY, (month_ago, month_ago))
        return path

    new = root("debian-bullseye-new", idle=False)
    old = root("debian-bullseye-old")
    (folder / "debian-bullseye-old.log").write_text("log")
    # the tests' minimal root beside the build root: used lately, so kept (they took turns
    # removing each other when any other root was removed)
    minimal = root("debian-bullseye-minimal", idle=False)
    busy = root("debian-bullseye-busy")
    _mkdirs(busy / "proc")
    making = root("debian-bullseye-making", complete=False)  # another maker's, not ours
    other_suite = root("debian-bookworm-x")
    real_is_mount = Path.is_mount
    monkeypatch.setattr(Path, "is_mount", lambda p: p == busy / "proc" or real_is_mount(p))
    lines = buildroot.prune_roots(folder, "bullseye", keep=new)
    assert not old.exists() and not (folder / "debian-bullseye-old.log").exists()
    assert new.is_dir() and minimal.is_dir() and making.is_dir() and other_suite.is_dir()
    assert busy.is_dir() and (busy / buildroot.READY).is_file()  # something mounted: left
    assert any("removed" in line and str(old) in line for line in lines)
    assert any("left" in line and "proc" in line for line in lines)
