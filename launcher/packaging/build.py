"""`lalo build SPEC`: the licence gate, then the models (hub cache), the engine (engine cache) and
the frozen lalo (packaging cache), then each target. Every outside dependency is a
constructor parameter, so tests can swap the slow parts for cached or fake ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher.engines.builder import build_engine
from launcher.engines.cmake import BuildProgress
from launcher.engines.install import BuiltEngine
from launcher.engines.registry import platform_tag, verify_engine
from launcher.errors import ConfigError, PackagingError
from launcher.models.catalog import Catalog
from launcher.models.hub import HubClient
from launcher.models.licenses import LicenseDecision
from launcher.packaging import layout
from launcher.packaging.atomic import remove_stale
from launcher.packaging.files import DigestCache
from launcher.packaging.frozen.freeze import Frozen, frozen_app, packaging_dir
from launcher.packaging.inputs import ModelInput, fetch_models, gate, model_inputs
from launcher.packaging.lock import packaging_lock
from launcher.packaging.notices.notice import (
    Packaged,
    engine_components,
    engine_source_tree,
    model_components,
)
from launcher.packaging.room import disk_filled, is_disk_full, require_room, tree_size
from launcher.packaging.spec import BundleSpec, Target
from launcher.packaging.targets.bundle import BundleResult, build_bundle
from launcher.packaging.targets.exe import ExeResult, build_exe
from launcher.packaging.targets.image import ImageResult, build_image
from launcher.packaging.targets.k8s import K8sResult, build_k8s
from launcher.packaging.targets.llamafiles import LlamafilesResult, build_llamafiles
from launcher.packaging.targets.windows import WindowsResult, build_windows

Report = Callable[[str], None]
Progress = Callable[[str, int, int], None]
# (variant, report, platform: None for this machine's, "windows" for the mingw-w64 build)
EngineSource = Callable[[str, Report, "str | None"], BuiltEngine]
AppSource = Callable[[Report], Frozen]


def cached_engine(variant: str, report: Report, platform_name: str | None = None) -> BuiltEngine:
    """The engine from lalo's cache, built first if missing (minutes, once); `platform_name`
    "windows": the mingw-w64 llama-server.exe."""
    shown = [-10]

    def progress(event: BuildProgress) -> None:
        if event.percent is None:
            report(f"engine: {event.message}")
        elif event.percent >= shown[0] + 10:
            shown[0] = event.percent
            report(f"engine: [{event.percent:3d}%] {event.message}")

    return build_engine(variant, progress=progress, platform_name=platform_name)


@dataclass(frozen=True)
class BuildResult:
    spec: BundleSpec
    targets: tuple[Target, ...]
    decisions: tuple[LicenseDecision, ...]
    llamafiles: LlamafilesResult | None
    bundle: BundleResult | None
    exe: ExeResult | None
    warnings: tuple[str, ...]
    seconds: float
    image: ImageResult | None = None
    k8s: K8sResult | None = None
    windows: WindowsResult | None = None


class Packager:
    """Builds a spec's targets into an output folder."""

    def __init__(
        self,
        *,
        report: Report,
        progress: Progress | None = None,
        catalog: Catalog | None = None,
        hub: HubClient | None = None,
        engine_source: EngineSource = cached_engine,
        app_source: AppSource = frozen_app,
        digests: DigestCache | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.report = report
        self.progress = progress
        self.catalog = catalog
        self.hub = hub
        self.engine_source = engine_source
        self.app_source = app_source
        self.digests = digests or DigestCache(packaging_dir() / "digests.json")
        self.clock = clock

    def build(
        self, spec: BundleSpec, out: Path, targets: Sequence[Target] | None = None
    ) -> BuildResult:
        started = self.clock()
        chosen = tuple(targets) if targets else spec.fields.targets
        models = self.check_licences(spec)
        texts = self._licence_texts(spec)
        models = fetch_models(models, self.report, self.hub)
        model_parts, warnings = model_components(models, texts)
        out.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale(out):
            self.report(f"removed {stale.name}: left by a build that was killed mid-write")
        llamafiles = bundle = exe = None
        if "llamafile" in chosen:
            llamafiles = build_llamafiles(
                spec, models, out, components=model_parts, digests=self.digests,
                report=self.report, progress=self.progress,
            )
            warnings += llamafiles.warnings
            self.digests.save()
        image = k8s = None
        if {"bundle", "exe", "image"} & set(chosen):
            with packaging_lock(packaging_dir(), self.report):
                bundle, exe = self._frozen_targets(spec, models, out, chosen, model_parts,
                                                   warnings)
            if bundle is not None:
                warnings += bundle.warnings
            if exe is not None:
                warnings += exe.warnings
            warnings += self._platform_notes(spec, chosen)
            if "image" in chosen:
                assert bundle is not None
                image = build_image(spec, models, out, bundle_dir=bundle.directory,
                                    report=self.report)
        windows = None
        if "windows" in chosen:
            windows = self._windows(spec, models, out, model_parts)
            warnings += windows.warnings
        if "k8s" in chosen:
            k8s = build_k8s(spec, models, out, self.report)
            warnings += k8s.warnings
        unique = tuple(dict.fromkeys(warnings))
        return BuildResult(
            spec=spec, targets=chosen, decisions=tuple(m.decision for m in models),
            llamafiles=llamafiles, bundle=bundle, exe=exe, warnings=unique,
            seconds=self.clock() - started, image=image, k8s=k8s, windows=windows,
        )

    def _windows(self, spec: BundleSpec, models: list[ModelInput], out: Path,
                 model_parts: list[Packaged]) -> WindowsResult:
        """`--target windows`: the mingw-w64 engine (built if missing: ~10 min), the launcher
        and the installer. Nothing Windows is made unless this target is asked for."""
        engine = self.engine_source("portable", self.report, "windows")
        verify_engine(engine.path)
        parts, _ = engine_components(engine.manifest, engine_source_tree(engine.manifest))
        return build_windows(spec, models, out, engine=engine, components=[*parts, *model_parts],
                             cache=packaging_dir(), report=self.report,
                             progress=self.progress)

    def _frozen_targets(
        self,
        spec: BundleSpec,
        models: list[ModelInput],
        out: Path,
        chosen: tuple[Target, ...],
        model_parts: list[Packaged],
        warnings: list[str],
    ) -> tuple[BundleResult | None, ExeResult | None]:
        """The bundle and the single binary: both need the engine and a frozen lalo. Engine
        notes go to `warnings`; each result carries its own."""
        engine, engine_parts = self._engine(spec, warnings)
        components = [*engine_parts, *model_parts]
        bundle = exe = None
        folder = "bundle" in chosen or "image" in chosen
        app = self.app_source(self.report) if folder else None
        needed = require_room(out, self._room(models, engine, app, chosen))
        try:
            if app is not None:
                # the image holds the bundle folder; its .tar.gz only when the bundle is asked for
                bundle = build_bundle(
                    spec, models, out, engine=engine, app=app, components=components,
                    digests=self.digests, report=self.report, progress=self.progress,
                    warnings=app.warnings, archive="bundle" in chosen,
                )
            if "exe" in chosen:
                exe = build_exe(spec, models, out, engine=engine, components=components,
                                digests=self.digests, report=self.report)
        except (OSError, PackagingError) as exc:
            if is_disk_full(exc):
                raise disk_filled(out, needed, exc) from exc
            raise
        return bundle, exe

    @staticmethod
    def _room(models: list[ModelInput], engine: BuiltEngine, app: Frozen | None,
              chosen: tuple[Target, ...]) -> list[tuple[str, int]]:
        """What the bundle folder, its archive and the single binary take on the output's
        disk (an archive is about as large as its folder: model weights do not compress)."""
        weights = sum(m.require_path().stat().st_size for m in models)
        runtime = sum(f.size for f in layout.engine_files(engine))
        parts: list[tuple[str, int]] = []
        if app is not None:
            parts.append(("the bundle folder", weights + runtime + tree_size(app.path)))
            if "bundle" in chosen:
                parts.append(("its archive", parts[0][1]))
        if "exe" in chosen:
            parts.append(("the single binary and its models", weights + runtime + 64 * 1024**2))
        return parts

    def check_licences(self, spec: BundleSpec) -> list[ModelInput]:
        """The licence gate, before anything is downloaded or copied."""
        models = model_inputs(spec, self.catalog)
        gate(models)  # refusals are the error; what passes is said here
        for model in models:
            self.report(f"licence gate: allowed: {model.decision.reason}")
        return models

    def _licence_texts(self, spec: BundleSpec) -> dict[str, Path]:
        texts: dict[str, Path] = {}
        for license_id, text in spec.fields.licenses.texts.items():
            path = spec.path(text)
            if not path.is_file():
                raise ConfigError(f"{spec.source}: licenses.texts.{license_id}: {path} does not exist")
            texts[license_id] = path
        return texts

    def _engine(self, spec: BundleSpec, warnings: list[str]) -> tuple[BuiltEngine, list[Packaged]]:
        variant = spec.fields.engine.llama_server.variant
        engine = self.engine_source(variant, self.report, None)
        self.report(f"engine: {engine.key} ({'cached' if engine.already_built else 'built'})")
        verify_engine(engine.path)  # every file against its manifest: never ship a damaged one
        if engine.manifest.variant == "native":
            warnings.append(
                "engine: the NATIVE llama-server (tuned to this build machine's CPU) is packaged "
                "because the spec asks for it; it may stop with 'illegal instruction' on other "
                "CPUs (use engine.llama_server.variant: portable)"
            )
        parts, notes = engine_components(engine.manifest, engine_source_tree(engine.manifest))
        warnings.extend(notes)
        return engine, parts

    @staticmethod
    def _platform_notes(spec: BundleSpec, chosen: Sequence[Target]) -> list[str]:
        host = platform_tag().split("-", 1)[0]
        others = [p for p in spec.fields.platforms if p != host]  # tags: linux, macos, windows
        kinds = " and ".join(t for t in chosen if t in ("bundle", "exe", "image"))
        if not others:
            return []
        note = " (for Windows clients: --target windows)" if "windows" in others else ""
        return [f"{kinds}: built for {platform_tag()} only; build on {', '.join(others)} "
                f"for those{note}"]
