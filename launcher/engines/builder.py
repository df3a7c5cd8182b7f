"""`lalo engine build`: build llama-server for a variant and platform, or find it already built.
The steps in order: the tools (launcher/engines/toolchain.py), the source and lalo's patches,
cmake's configure and compile, in the old-glibc root for the portable Linux engine
(cmake.py, root_build.py), then the atomic install with its manifest (install.py)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher import __version__, paths
from launcher.engines import buildroot, patch_series
from launcher.engines import source as sources
from launcher.engines.buildroot import BuildRoot
from launcher.engines.cmake import (
    BUILDING,
    TARGETS,
    TOOLCHAIN_FILE,
    WINDOWS,
    WINDOWS_TOOLCHAIN,
    BuildProgress,
    BuildSession,
    CommandRunner,
    DiskFullError,
    ProgressCallback,
    Variant,
    cmake_flags,
    configure_argv,
    configured_elsewhere,
    cpu_variant_targets,
    drop_unfinished,
    require_build_room,
    run_command,
    target_platform,
)
from launcher.engines.install import (
    BuiltEngine,
    build_lock,
    built_from,
    existing_engine,
    install_engine,
    same_build,
)
from launcher.engines.registry import SERVER, engine_key, exe_name, platform_tag, read_manifest
from launcher.engines.root_build import (
    ROOT_BUILD,
    ROOT_SOURCE,
    copy_source_into,
    in_root,
    root_tools,
    unbuildable_variants,
)
from launcher.engines.toolchain import (
    check_cuda_libraries,
    check_mingw,
    check_tools,
    compiler_version,
    find_nvcc,
    nvcc_version,
)
from launcher.errors import EngineError


@dataclass(frozen=True)
class _Place:
    """Where one build happens: on this machine, or (paths as the root sees them) in a root."""

    source_dir: Path
    build_dir: Path  # as the build's commands see it
    host_build: Path  # the same folder on this machine
    runner: CommandRunner
    left_out: tuple[str, ...] = ()  # CPU variants the root's gcc cannot build


class EngineBuilder:
    """Builds one engine; every outside dependency is a constructor parameter for tests."""

    def __init__(
        self,
        *,
        engines_root: Path | None = None,
        cache_root: Path | None = None,
        runner: CommandRunner = run_command,
        which: Callable[[str], str | None] = shutil.which,
        fetch_pinned: Callable[[Callable[[str], None]], sources.LlamaCppSource] | None = None,
        clock: Callable[[], float] = time.monotonic,
        compiler_probe: Callable[[str | Sequence[str]], str] = compiler_version,
        nvcc_probe: Callable[[str], str] = nvcc_version,
        cuda_check: Callable[[str], None] = check_cuda_libraries,
        build_root: Callable[[Callable[[str], None]], BuildRoot] | None = None,
        use_build_root: bool | None = None,
        cublas_download: Callable[[str, Path], Path] | None = None,
        patches: Sequence[patch_series.Patch] | None = None,
    ) -> None:
        """`build_root` makes (or finds) the old-glibc root the portable Linux engine is built
        in; `use_build_root` False builds it on this machine instead (default: on Linux).
        `patches`: the series applied to the pinned source (default: lalo's own)."""
        self.patches = list(patches) if patches is not None else patch_series.series()
        self.engines_root = engines_root if engines_root is not None else paths.engines_dir()
        self.cache_root = cache_root if cache_root is not None else paths.cache_dir()
        self.runner = runner
        self.which = which
        self.fetch_pinned = fetch_pinned or self._fetch_pinned
        self.clock = clock
        self.compiler_probe = compiler_probe
        self.nvcc_probe = nvcc_probe
        self.cuda_check = cuda_check
        self.build_root = build_root or self._default_root
        self.use_build_root = (sys.platform.startswith("linux") if use_build_root is None
                               else use_build_root)
        self.cublas_download = cublas_download  # None: pip (cuda_deps.pip_download)

    def _default_root(self, note: Callable[[str], None]) -> BuildRoot:
        return buildroot.ensure_root(self.cache_root, report=note)

    def _fetch_pinned(self, note: Callable[[str], None]) -> sources.LlamaCppSource:
        return sources.pinned_source(cache=self.cache_root / "sources", progress=note)

    def build(
        self,
        variant: str = "native",
        source: Path | None = None,
        jobs: int | None = None,
        progress: ProgressCallback | None = None,
        *,
        force: bool = False,
        cuda_archs: Sequence[str] | None = None,
        platform_name: str | None = None,
    ) -> BuiltEngine:
        """Build (or find already built) the engine for `variant` from `source` (None: pinned
        sdist). Blocks for minutes; interrupting it leaves no engine directory behind.
        `cuda_archs`: the cuda variant's GPU architectures (default CUDA_ARCHITECTURES).
        `platform_name`: "windows" cross-compiles llama-server.exe with mingw-w64."""
        if cuda_archs and variant != "cuda":
            raise EngineError("--cuda-arch is for --variant cuda")
        plat = target_platform(platform_name)
        flags = cmake_flags(variant, cuda_archs, plat)
        in_root = self.use_build_root and variant == "portable" and plat == platform_tag()
        nvcc = find_nvcc(self.which) if variant == "cuda" else None
        report = progress or (lambda event: None)
        if nvcc is not None:
            flags = (*flags, *self._cuda_flags(nvcc, report))
        if jobs is not None and jobs < 1:
            raise EngineError(f"--jobs must be >= 1, got {jobs}")

        # Decide "already built" before any slow step: for the pinned sdist from manifests,
        # so a second call needs neither the source nor cmake.
        tree: sources.LlamaCppSource | None = None
        root_label = f"debian-{buildroot.SUITE}" if in_root else None
        # lalo's patch series goes on the pinned source; a user's own tree is built as it is
        patches = self.patches if source is None else []
        patches_id = patch_series.series_id(patches)
        if source is not None:
            tree = sources.user_source(source)
            existing = None if force else existing_engine(
                self.engines_root, engine_key(tree.commit, variant, plat))
        else:
            existing = None if force else built_from(self.engines_root, sources.SDIST_LABEL,
                                                      variant, plat, patches_id)
        if existing is not None and same_build(existing, flags, root_label):
            return existing

        if plat == WINDOWS and platform_tag() != WINDOWS:
            tools = check_mingw(self.which)
        elif not in_root:
            tools = check_tools(self.which)
        else:
            tools = {}
        root = None
        if in_root:
            root = self.build_root(lambda text: report(BuildProgress("source", text)))
            tools = root_tools(root)
        if tree is None:
            tree = self.fetch_pinned(lambda text: report(BuildProgress("source", text)))
        if patches:
            report(BuildProgress("source", f"applying lalo's {len(patches)} llama.cpp patch(es) "
                                           f"(series {patches_id})"))
            tree = dataclasses.replace(tree, tree=patch_series.patched_tree(
                tree.tree, tree.commit7, patches, self.cache_root / "sources"))
        key = engine_key(tree.commit, variant, plat, patches_id)
        self.engines_root.mkdir(parents=True, exist_ok=True)
        with build_lock(self.engines_root, key):
            return self._build_locked(key, tree, variant, flags, tools, jobs, report, force, nvcc,
                                      plat=plat, root=root, patches=patches)

    def _cuda_flags(self, nvcc: str, report: ProgressCallback) -> tuple[str, ...]:
        """cuBLAS (the toolkit's, else NVIDIA's wheel from PyPI) and the driver library:
        launcher/engines/cuda_deps.py (kept out of this module on purpose)."""
        from launcher.engines.cuda_deps import cuda_dependency_flags, pip_download

        return cuda_dependency_flags(
            nvcc, check=self.cuda_check, cache_root=self.cache_root, version=self.nvcc_probe,
            note=lambda text: report(BuildProgress("source", text)),
            download=self.cublas_download or pip_download)

    def _build_locked(
        self,
        key: str,
        tree: sources.LlamaCppSource,
        variant: str,
        flags: tuple[str, ...],
        tools: dict[str, str],
        jobs: int | None,
        report: ProgressCallback,
        force: bool,
        nvcc: str | None = None,
        *,
        plat: str | None = None,
        root: BuildRoot | None = None,
        patches: Sequence[patch_series.Patch] = (),
    ) -> BuiltEngine:
        plat = plat or platform_tag()
        label = root.label if root is not None else None
        if not force:  # built by another process meanwhile, or from another source label
            existing = existing_engine(self.engines_root, key)
            if existing is not None and same_build(existing, flags, label):
                return existing
        for stale in self.engines_root.glob(f".*-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build; we hold the lock

        compiler = (self.compiler_probe(tools["cc"]) if root is None
                    else self.compiler_probe(root.chroot_argv([tools["cc"]])))
        place = self._place(key, tree, compiler, root)
        if force or configured_elsewhere(place.host_build, place.source_dir):
            shutil.rmtree(place.host_build, ignore_errors=True)
        place.host_build.mkdir(parents=True, exist_ok=True)
        try:
            return self._configure_and_compile(key, tree, variant, flags, tools, jobs, report,
                                               nvcc, plat, root, patches, place, compiler)
        except DiskFullError:
            shutil.rmtree(place.host_build, ignore_errors=True)  # never resumed from half
            raise

    def _configure_and_compile(
        self, key: str, tree: sources.LlamaCppSource, variant: str, flags: tuple[str, ...],
        tools: dict[str, str], jobs: int | None, report: ProgressCallback, nvcc: str | None,
        plat: str, root: BuildRoot | None, patches: Sequence[patch_series.Patch],
        place: _Place, compiler: str,
    ) -> BuiltEngine:
        if not (place.host_build / "CMakeCache.txt").is_file():  # a first build: room for it
            require_build_room(place.host_build, variant)
        dropped = drop_unfinished(place.host_build)
        if dropped:
            report(BuildProgress("configure", f"the last build of {key} did not finish (killed, "
                                              f"or the power went): {dropped} file(s) it was "
                                              "writing removed, to be made again"))
        marker = place.host_build / BUILDING
        marker.touch()  # removed when the build ends by itself: left only by a kill
        flags_run = self._flags_run(flags, plat, place)
        log_path = self.cache_root / "logs" / f"engine-build-{key}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = self.clock()
        # Line-buffered so `tail -f` on the log follows a running build.
        with log_path.open("w", encoding="utf-8", buffering=1) as log_file:
            session = BuildSession(place.runner, log_file, log_path, report)
            where = f" in {root.path}" if root is not None else ""
            log_file.write(f"# lalo {__version__}: building {key} from {tree.label}{where}\n")
            report(BuildProgress("configure", f"configuring {key}{where}"))
            session.run("configure", configure_argv(tools["cmake"], place.source_dir,
                                                    place.build_dir, flags_run, nvcc),
                        cwd=place.host_build)
            if variant == "portable" and plat != WINDOWS and place.left_out:
                log_file.write(f"# {compiler} cannot build the {', '.join(place.left_out)} CPU "
                               "variants: left out\n")
            try:
                self._compile(session, tools["cmake"], place, variant, plat, jobs, report)
            except EngineError:  # make removed what it did not finish: the tree is sound
                marker.unlink(missing_ok=True)
                raise
            marker.unlink(missing_ok=True)
        report(BuildProgress("install", f"installing into {self.engines_root / key}"))
        manifest_fields = {
            "commit": tree.commit,
            "commit_origin": tree.commit_origin,
            "source": tree.label,
            "compiler": compiler,
            "left_out": ",".join(place.left_out),
        }
        if nvcc is not None:
            manifest_fields["cuda"] = self.nvcc_probe(nvcc)
        manifest_fields["patches"] = ",".join(p.name for p in patches)
        manifest_fields["patches_id"] = patch_series.series_id(list(patches))
        engine_dir = install_engine(
            self.engines_root, key, variant, flags, place.host_build, manifest_fields,
            lambda: self.clock() - started, plat=plat, root=root,
        )
        manifest = read_manifest(engine_dir)
        return BuiltEngine(
            key=key, path=engine_dir, server=engine_dir / "bin" / exe_name(SERVER, plat),
            manifest=manifest, already_built=False, log_path=log_path,
        )

    def _place(self, key: str, tree: sources.LlamaCppSource, compiler: str,
               root: BuildRoot | None) -> _Place:
        if root is None:
            build_dir = self.cache_root / "build" / key
            # the source as CMakeCache.txt records it
            return _Place(tree.tree.resolve(), build_dir, build_dir, self.runner)
        # The build sees only the root: the source is copied in, the build tree lives there.
        source_dir = Path(f"{ROOT_SOURCE}/llama.cpp-{tree.commit}")
        left_out = unbuildable_variants(compiler)
        copy_source_into(tree.tree, root.host_path(str(source_dir)), left_out, tree.commit)
        build_dir = Path(f"{ROOT_BUILD}/{key}")
        return _Place(source_dir, build_dir, root.host_path(str(build_dir)),
                      in_root(self.runner, root), tuple(left_out))

    @staticmethod
    def _flags_run(flags: tuple[str, ...], plat: str, place: _Place) -> tuple[str, ...]:
        """The flags as configure gets them: a cross build names its toolchain file."""
        if plat != WINDOWS or platform_tag() == WINDOWS:
            return flags
        toolchain = place.host_build / TOOLCHAIN_FILE
        toolchain.write_text(WINDOWS_TOOLCHAIN, encoding="utf-8")
        return (*flags, f"-DCMAKE_TOOLCHAIN_FILE={toolchain}")

    @staticmethod
    def _compile(session: BuildSession, cmake: str, place: _Place, variant: str, plat: str,
                 jobs: int | None, report: ProgressCallback) -> None:
        targets = [SERVER] if plat == WINDOWS else list(TARGETS)
        if variant == "portable" and plat != WINDOWS:
            targets += cpu_variant_targets(session, cmake, place.build_dir, place.host_build)
        parallel = jobs or os.cpu_count() or 1
        what = f"compiling {', '.join(targets)} with {parallel} jobs"
        report(BuildProgress("build", what, 0))
        session.run(
            "build",
            [cmake, "--build", str(place.build_dir), "--config", "Release",
             "--parallel", str(parallel), "--target", *targets],
            cwd=place.host_build,
        )


def build_engine(
    variant: Variant | str = "native",
    source: Path | None = None,
    jobs: int | None = None,
    progress: ProgressCallback | None = None,
    *,
    force: bool = False,
    cuda_archs: Sequence[str] | None = None,
    platform_name: str | None = None,
) -> BuiltEngine:
    """Build llama-server into the user cache (see EngineBuilder.build)."""
    return EngineBuilder().build(variant, source, jobs, progress, force=force,
                                 cuda_archs=cuda_archs, platform_name=platform_name)
