"""`lalo build --target image`: `DIR/NAME.oci.tar`, an OCI image archive of the bundle that
`podman load` / `docker load` read. Built without a daemon by Debian's buildah, FROM scratch:
the bundle folder at /app (frozen lalo, llama-server, models unless they come from a volume),
the system libraries its programs load, a non-root user, `lalo up` as the command.

Reproducible: buildah runs on a private, throw-away storage (nothing is left in the machine's
image store), commits with `--timestamp 0 --omit-history`, pushes to an OCI layout folder, and
that folder is archived with sorted names, mtime 0 and numeric owners: the same bundle gives
the same image digest and the same archive bytes.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher import __version__
from launcher.errors import PackagingError
from launcher.packaging import layout
from launcher.packaging.formats.archive import write_tar
from launcher.packaging.frozen.entry import PROBE_FLAG
from launcher.packaging.inputs import ModelInput
from launcher.packaging.spec import BundleSpec
from launcher.packaging.targets.bundle import MANIFEST, MODELS
from launcher.packaging.targets.image_layout import (
    APP_DIR,
    CONFIG_MOUNT,
    ENTRYPOINT,
    GID,
    UID,
    elf_files,
    image_environment,
    owned_folders,
    serve_arguments,
    system_libraries,
    write_system_root,
)

SUFFIX = ".oci.tar"
BUILD_TIMEOUT = 1800.0
Report = Callable[[str], None]
Runner = Callable[[Sequence[str]], str]


@dataclass(frozen=True)
class ImageResult:
    archive: Path
    reference: str  # the name `podman load` gives it
    digest: str  # the manifest digest, sha256:...
    archive_size: int
    models_mode: str
    seconds: float


def run_tool(argv: Sequence[str]) -> str:
    """Run buildah; its stdout, or PackagingError with its last error lines."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                              check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise PackagingError(
            f"the image target needs {argv[0]} (Debian/Ubuntu: apt-get install buildah)"
        ) from None
    except subprocess.TimeoutExpired:
        raise PackagingError(f"{argv[0]} {argv[1:3]} did not finish in {BUILD_TIMEOUT:g} s") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise PackagingError(f"{' '.join(argv[:6])}... failed ({done.returncode}):\n{tail}")
    return done.stdout


def image_archive_name(spec: BundleSpec) -> str:
    return f"{spec.name}{SUFFIX}"


def build_image(
    spec: BundleSpec,
    models: Sequence[ModelInput],
    out: Path,
    *,
    bundle_dir: Path,
    report: Report,
    run: Runner = run_tool,
    buildah: str = "buildah",
) -> ImageResult:
    """Build the image from the bundle folder `bundle_dir` (made by build_bundle)."""
    started = time.monotonic()
    mode = spec.fields.image.models
    reference = spec.image_reference()
    work = out / f".{spec.name}.image-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # A private store: builds leave nothing in /var/lib/containers, and two builds never share
    # (or race on) a cached layer. vfs needs no overlay mounts.
    tool = [buildah, "--root", str(work / "storage"), "--runroot", str(work / "run"),
            "--storage-driver", "vfs"]
    try:
        app = _app_tree(bundle_dir, work / "app", mode)
        system = work / "system"
        libraries = system_libraries(elf_files(app), app)
        write_system_root(system, libraries)
        report(f"image: {len(libraries)} system libraries from the build machine "
               f"({', '.join(sorted({p.name for p in libraries})[:6])}, ...)")
        config_dir = work / "config"
        config_dir.mkdir()
        (config_dir / "lalo.yaml").write_text(_image_config(spec, models, bundle_dir),
                                              encoding="utf-8")
        empty = work / "empty"
        empty.mkdir(mode=0o755)
        container = run([*tool, "from", "scratch"]).strip()
        run([*tool, "copy", container, str(system), "/"])
        run([*tool, "copy", container, str(app), APP_DIR])
        run([*tool, "copy", container, str(config_dir), CONFIG_MOUNT])
        for folder in owned_folders():
            run([*tool, "copy", "--chown", f"{UID}:{GID}", container, str(empty), folder])
        if mode == "volume":
            run([*tool, "copy", container, str(empty), spec.fields.image.models_dir])
        run([*tool, "config", *_config_flags(spec, mode), container])
        report(f"image: committing {reference}")
        run([*tool, "commit", "--quiet", "--timestamp", "0", "--omit-history", "--rm",
             container, reference])
        layout_dir = work / "oci"
        run([*tool, "push", "--quiet", "--remove-signatures", reference,
             f"oci:{layout_dir}:{reference}"])
        archive = out / image_archive_name(spec)
        write_tar(layout_dir, archive)
        digest = _manifest_digest(layout_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ImageResult(archive=archive, reference=reference, digest=digest,
                       archive_size=archive.stat().st_size, models_mode=mode,
                       seconds=time.monotonic() - started)


def _app_tree(bundle_dir: Path, dest: Path, mode: str) -> Path:
    """The bundle as /app holds it: hard links (or copies) of its files; without models/ when
    the models come from a volume."""
    if not (bundle_dir / MANIFEST).is_file():
        raise PackagingError(f"{bundle_dir}: not a lalo bundle (no {MANIFEST})")

    def link(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    ignore = shutil.ignore_patterns(MODELS) if mode == "volume" else None
    try:
        shutil.copytree(bundle_dir, dest, symlinks=True, copy_function=link, ignore=ignore)
    except (OSError, shutil.Error) as exc:
        raise PackagingError(f"cannot stage {bundle_dir} for the image: {exc}") from exc
    return dest


def _image_config(spec: BundleSpec, models: Sequence[ModelInput], bundle_dir: Path) -> str:
    """/etc/lalo/lalo.yaml: the bundle's config with the models in /app/models or the volume."""
    files = layout.model_file_names(models)
    manifest = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))
    folder = f"{APP_DIR}/{MODELS}" if spec.fields.image.models == "embed" \
        else spec.fields.image.models_dir
    header = (f"# lalo.yaml of the {spec.name} image, generated by `lalo build --target image` "
              f"from {spec.source.name}.\n")
    return layout.bundled_config(
        spec, models, {n: f"{folder}/{f}" for n, f in files.items()},
        engine_path=layout.bundle_engine_path(), variant=str(manifest["engine"]["variant"]),
        header=header,
    )


def _config_flags(spec: BundleSpec, mode: str) -> list[str]:
    port = spec.config.proxy.port
    flags = [
        "--entrypoint", json.dumps([ENTRYPOINT]),
        "--cmd", json.dumps(serve_arguments()),
        "--user", f"{UID}:{GID}",
        "--port", f"{port}/tcp",
        "--workingdir", APP_DIR,
        "--stop-signal", "SIGTERM",
        "--os", "linux",
        "--arch", _oci_arch(),
    ]
    for key, value in image_environment().items():
        flags += ["--env", f"{key}={value}"]
    labels = {
        "org.opencontainers.image.title": spec.name,
        "org.opencontainers.image.version": __version__,
        "org.opencontainers.image.description": f"lalo {__version__} serving {spec.name}",
        # OCI image configs have no HEALTHCHECK (a Docker-format field): this is the command
        # to give `podman run --health-cmd` or a Kubernetes exec probe
        "ai.lalo.healthcheck": json.dumps([ENTRYPOINT, PROBE_FLAG, "/health"]),
        "ai.lalo.models": mode,
    }
    for key, value in labels.items():
        flags += ["--label", f"{key}={value}"]
    return flags


def _oci_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _manifest_digest(layout_dir: Path) -> str:
    try:
        index = json.loads((layout_dir / "index.json").read_text(encoding="utf-8"))
        return str(index["manifests"][0]["digest"])
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise PackagingError(f"{layout_dir}: no image manifest in index.json ({exc})") from exc
