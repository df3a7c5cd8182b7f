"""`lalo build SPEC [--target llamafile|bundle|exe|image|k8s|windows] [--out DIR]`: package per
`bundles/SPEC.yaml`."""

from __future__ import annotations

import shutil
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TextIO

import typer

from launcher.cli.app import app
from launcher.packaging.build import BuildResult, Packager
from launcher.packaging.spec import Target, load_spec
from launcher.packaging.targets.windows import WindowsResult
from launcher.units import format_size


class TargetChoice(StrEnum):
    llamafile = "llamafile"
    bundle = "bundle"
    exe = "exe"
    image = "image"
    k8s = "k8s"
    windows = "windows"


class ByteProgress:
    """Copy and archive progress: one line rewritten in place on a terminal, else every 25 %."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.interactive = stream.isatty()
        self.shown: dict[str, int] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        if self.interactive:
            width = shutil.get_terminal_size((100, 20)).columns
            text = f"  {what}: {percent:3d}% of {format_size(total)}"[: width - 1]
            self.stream.write("\r\x1b[K" + text + ("\n" if done >= total else ""))
            self.stream.flush()
        elif percent // 25 > self.shown.get(what, -1) and total >= 64 * 1024**2:
            self.shown[what] = percent // 25
            self.stream.write(f"  {what}: {percent}% of {format_size(total)}\n")
            self.stream.flush()


def _say(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def build(
    spec: Annotated[str, typer.Argument(help="A bundle spec: a path, or NAME for bundles/NAME.yaml.")],
    target: Annotated[
        list[TargetChoice] | None,
        typer.Option("--target", "-t", help="What to build (repeatable; default: the spec's targets)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("dist"),
) -> None:
    """Package models with lalo: per-model llamafiles, a folder bundle (+ .tar.gz), one
    executable, an OCI image (NAME.oci.tar), a Kubernetes kustomize base (NAME-k8s/), or for
    Windows clients NAME.exe and its installer NAME-setup.exe (--target windows)."""
    loaded = load_spec(spec)
    targets: list[Target] | None = [t.value for t in target] if target else None
    packager = Packager(report=_say, progress=ByteProgress(sys.stderr))
    result = packager.build(loaded, out.resolve(), targets)
    _summary(result)


def _summary(result: BuildResult) -> None:
    for warning in result.warnings:
        _say(f"warning: {warning}")
    if result.llamafiles is not None:
        for item in result.llamafiles.files:
            typer.echo(f"llamafile  {item.path}  {format_size(item.size)}")
        typer.echo(f"llamafile  {result.llamafiles.notice_dir}/  NOTICE and LICENSES")
    if result.bundle is not None:
        bundle = result.bundle
        typer.echo(f"bundle     {bundle.directory}/  {format_size(bundle.size)}  (start: "
                   f"{bundle.directory}/start)")
        if bundle.archive is not None:
            typer.echo(f"bundle     {bundle.archive}  {format_size(bundle.archive_size)}  "
                       f"sha256 {bundle.archive_sha256}")
    if result.exe is not None:
        exe = result.exe
        where = "embedded" if exe.models_mode == "embed" else f"beside it in {exe.models_dir}/"
        typer.echo(f"exe        {exe.path}  {format_size(exe.size)}  (models {where}, "
                   f"{format_size(exe.models_size)})")
    if result.image is not None:
        image = result.image
        typer.echo(f"image      {image.archive}  {format_size(image.archive_size)}  "
                   f"{image.reference}  {image.digest}  (models: {image.models_mode})")
        typer.echo(f"           run: podman load -i {image.archive} && podman run --rm "
                   f"-p 127.0.0.1:{result.spec.config.proxy.port}:"
                   f"{result.spec.config.proxy.port} {image.reference}")
    if result.k8s is not None:
        k8s = result.k8s
        typer.echo(f"k8s        {k8s.directory}/  memory request "
                   f"{format_size(k8s.size.memory_request)}, limit "
                   f"{format_size(k8s.size.memory_limit)}  (kubectl apply -k {k8s.directory})")
    if result.windows is not None:
        _windows_summary(result.windows)
    typer.echo(f"built {', '.join(result.targets)} of {result.spec.name} in {result.seconds:.1f} s")


def _windows_summary(windows: WindowsResult) -> None:
    if windows.exe is not None:
        typer.echo(f"windows    {windows.exe}  {format_size(windows.exe.stat().st_size)}  "
                   "(one file: unpacks once, then serves every model on one port)")
    if windows.setup is not None:
        typer.echo(f"windows    {windows.setup}  {format_size(windows.setup.stat().st_size)}  "
                   "(installer: /S silent, /D=DIR)")
    typer.echo(f"windows    {windows.folder}/  {format_size(windows.size)}  (runs in place)")
    for model in windows.models:
        typer.echo(f"           model {model.name}: about {format_size(model.memory)} when loaded")
