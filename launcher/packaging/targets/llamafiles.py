"""`lalo build --target llamafile`: `DIR/MODEL.llamafile` per model = the spec's llamafile runtime
(checked against its sha256) + the GGUF stored page-aligned + `.args` with the model's
settings (launcher/packaging/formats/llamafile_writer.py writes the bytes). NOTICE and
LICENSES/ for them go to `DIR/llamafile-NOTICE/`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher import __version__
from launcher.config import ModelConfig
from launcher.errors import PackagingError
from launcher.models.licenses import Component
from launcher.packaging.files import DigestCache
from launcher.packaging.formats.llamafile_writer import LlamafileResult, write_llamafile
from launcher.packaging.inputs import ModelInput
from launcher.packaging.notices.license_texts import standard_text
from launcher.packaging.notices.notice import LicenseFile, Packaged, safe_name, write_notice
from launcher.packaging.spec import BundleSpec

NOTICE_DIR = "llamafile-NOTICE"
SUFFIX = ".llamafile"
Report = Callable[[str], None]
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class LlamafilesResult:
    files: tuple[LlamafileResult, ...]
    notice_dir: Path
    warnings: tuple[str, ...]
    seconds: float


def llamafile_args(model: ModelConfig) -> list[str]:
    """The `.args` tokens for a model's settings (before the user's own arguments)."""
    args = ["-c", str(model.ctx_size)]
    if model.threads != "auto":
        args += ["-t", str(model.threads)]
    if model.parallel != 1:
        args += ["-np", str(model.parallel)]
    if model.embeddings:
        args.append("--embeddings")
    return [*args, *model.args]


def check_runtime(spec: BundleSpec, digests: DigestCache) -> Path:
    """The runtime the spec names, present and matching its sha256."""
    llamafile = spec.fields.engine.llamafile
    runtime = spec.llamafile_runtime()
    if runtime is None:
        raise PackagingError(
            f"{spec.source}: engine.llamafile.runtime: the llamafile target needs a llamafile "
            "runtime (a path and its sha256)"
        )
    if not runtime.is_file():
        raise PackagingError(f"{spec.source}: engine.llamafile.runtime: {runtime} does not exist")
    actual = digests.sha256(runtime)
    if llamafile.sha256 is None:
        raise PackagingError(
            f"{spec.source}: engine.llamafile.sha256 is required to pin the runtime; "
            f"{runtime.name} has sha256 {actual}"
        )
    if actual != llamafile.sha256:
        raise PackagingError(
            f"{spec.source}: engine.llamafile.runtime: {runtime} has sha256 {actual}, the spec "
            f"pins {llamafile.sha256}"
        )
    return runtime


def entry_name(model: ModelInput) -> str:
    """The model's entry in the llamafile zip: its file name, unless the runtime would
    misread it (`@`), then `<model>.gguf`."""
    name = model.file_name if model.file_name.endswith(".gguf") else f"{model.file_name}.gguf"
    return name if "@" not in name and "/" not in name else f"{safe_name(model.name)}.gguf"


def build_llamafiles(
    spec: BundleSpec,
    models: Sequence[ModelInput],
    out: Path,
    *,
    components: Sequence[Packaged],
    digests: DigestCache,
    report: Report,
    progress: Progress | None = None,
) -> LlamafilesResult:
    started = time.monotonic()
    runtime = check_runtime(spec, digests)
    version = spec.fields.engine.llamafile.version
    windows = "windows" in spec.fields.platforms
    results: list[LlamafileResult] = []
    warnings: list[str] = []
    for model in models:
        if model.config.kv_cache != "f16":
            # lalo passes a KV cache type to llama-server only (llamafile runtimes unverified)
            raise PackagingError(f"{spec.source}: models.{model.name}.kv_cache: "
                                 f"{model.config.kv_cache} needs llama-server; the llamafile "
                                 "target's runtime gets none: use f16 for this target")
        if model.config.request_rules:
            raise PackagingError(f"{spec.source}: models.{model.name}: defaults, set, limits "
                                 "and strip are applied by lalo's proxy, which a llamafile "
                                 "does not run: remove them for this target (or set the "
                                 "server's defaults in args, e.g. --temp 0)")
        target = out / f"{model.name}{SUFFIX}"
        report(f"llamafile: writing {target.name}")

        def copied(done: int, total: int, what: str = target.name) -> None:
            if progress is not None:
                progress(what, done, total)

        result = write_llamafile(
            runtime, model.require_path(), target, args=llamafile_args(model.config),
            windows_target=windows, runtime_version=version, entry_name=entry_name(model),
            progress=copied,
        )
        results.append(result)
        warnings.extend(result.warnings)
    notice_dir = out / NOTICE_DIR
    runtime_part = Packaged(
        Component("llamafile runtime", "Apache-2.0", "Copyright 2023 Mozilla Foundation",
                  "https://github.com/mozilla-ai/llamafile", version=version,
                  note=f"{runtime.name}, sha256 {spec.fields.engine.llamafile.sha256}; it "
                  "contains llama.cpp (MIT) and cosmopolitan (ISC)"),
        (LicenseFile("llamafile/LICENSE",
                     standard_text("Apache-2.0", "Copyright 2023 Mozilla Foundation") or ""),),
    )
    write_notice(notice_dir, f"{spec.name} llamafiles (lalo {__version__})",
                 [runtime_part, *components])
    return LlamafilesResult(tuple(results), notice_dir, tuple(warnings),
                            time.monotonic() - started)
