"""`lalo engine build` and `lalo engine list`: build llama-server from llama.cpp source into the
user cache (and, with --wheel, make a wheel of it), and show every llama-server lalo can find.
"""

from __future__ import annotations

import json
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from launcher.cli.app import app
from launcher.config import load_config, resolve_path
from launcher.engines.builder import build_engine
from launcher.engines.install import BuiltEngine
from launcher.engines.installed import installed_engines
from launcher.engines.progress import BuildProgressView, ConsoleLines, duration
from launcher.engines.registry import FoundEngine, find_llama_server, list_engines
from launcher.errors import UsageError
from launcher.units import format_size

engine_app = typer.Typer(
    name="engine",
    help="Build llama-server from llama.cpp source (or a wheel of it); list the engines lalo finds.",
    no_args_is_help=True,
)
app.add_typer(engine_app, name="engine")


class VariantChoice(StrEnum):
    native = "native"
    portable = "portable"
    cuda = "cuda"


class PlatformChoice(StrEnum):
    host = "host"
    windows = "windows"


@engine_app.command("build")
def build(
    variant: Annotated[
        VariantChoice | None,
        typer.Option(
            "--variant",
            help="native (the default): tuned to this CPU, static. "
            "portable (the default with --wheel or --platform windows): runs on other CPUs of "
            "this OS/arch (CPU variant picked at run time). "
            "cuda: NVIDIA GPUs (needs the CUDA toolkit's nvcc; no GPU needed to build; "
            "cuBLAS from NVIDIA's PyPI wheel when the toolkit has none).",
            show_default=False,
        ),
    ] = None,
    platform: Annotated[
        PlatformChoice,
        typer.Option("--platform", help="host: this machine's OS. windows: cross-compile "
                     "llama-server.exe with mingw-w64 (portable variant; static, x86-64 with "
                     "AVX2; about 10 min)."),
    ] = PlatformChoice.host,
    cuda_arch: Annotated[
        list[str] | None,
        typer.Option("--cuda-arch", help="cuda variant: GPU architectures to compile for "
                     "(repeatable, e.g. 89; default 80, 86, 89, 90: A100, RTX 30xx, RTX 40xx, H100)."),
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option(
            "--source",
            help="A llama.cpp checkout to build (default: the pinned llama-cpp-python sdist).",
            file_okay=False,
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", "-j", min=1, help="Parallel compile jobs (default: all CPUs)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild from a clean build tree even if already built.")
    ] = False,
    wheel: Annotated[
        bool,
        typer.Option("--wheel", help="Also write the engine as a wheel (lalo-engine-VARIANT, "
                     "tagged manylinux for the glibc it needs) to publish on your own package "
                     "index: `pip install lalo-engine-portable` beside lalo and `lalo up` "
                     "starts without compiling. An engine already built is reused. Linux only."),
    ] = False,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="--wheel: the folder to write the wheel into.",
                           file_okay=False)
    ] = Path("dist"),
) -> None:
    """Build llama-server and llama-quantize into lalo's cache (minutes; done once per version),
    showing the percentage and, once it can tell, the time left.

    On Linux the portable variant is compiled inside a Debian 11 root (made once with
    debootstrap; needs root) so that it runs on glibc 2.31 and later.

    With --wheel the engine (an engine already in the cache is reused) is also written as a
    wheel for your own package index (docs/packaging.md, "An engine wheel for your index")."""
    if wheel and platform is PlatformChoice.windows:
        raise UsageError("--wheel makes Linux engine wheels; a Windows engine (--platform "
                         "windows) goes into the Windows package (`lalo build SPEC --target windows`)")
    # Windows builds only the portable variant, and a wheel is meant for other machines
    portable = wheel or platform is PlatformChoice.windows
    chosen = variant or (VariantChoice.portable if portable else VariantChoice.native)
    view = BuildProgressView(ConsoleLines(sys.stderr))
    started = time.monotonic()
    try:
        built = build_engine(chosen.value, source, jobs, view, force=force,
                             cuda_archs=cuda_arch, platform_name=platform.value)
    finally:
        view.close()
    _say_built(built, time.monotonic() - started)
    if wheel:
        from launcher.packaging.targets.engine_wheel import write_engine_wheel

        made = write_engine_wheel(built.path, out)
        typer.echo(f"wheel {made.path}  {format_size(made.size)}  (glibc {made.glibc} or later; "
                   f"publish it on your index, then `pip install {made.name}` beside lalo)")


def _say_built(built: BuiltEngine, seconds: float) -> None:
    if built.already_built:
        typer.echo(f"already built: {built.server}")
        return
    size = sum(f.size for f in built.manifest.files)
    typer.echo(f"built {built.key} in {duration(seconds)} ({format_size(size)} installed): "
               f"{built.server}")


@engine_app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Config file whose engines.llama_server to honour."),
    ] = None,
) -> None:
    """Every llama-server found (configured, built here, installed from an engine wheel, on
    PATH) and where it came from; * marks the one lalo uses."""
    loaded = load_config(config, check_files=False)
    settings = loaded.config.engines.llama_server
    configured = settings.path
    if configured != "auto":
        configured = str(resolve_path(configured, loaded.base_dir))
    # the installed wheels read once; those skipped are listed below, not logged
    found, skipped = installed_engines()
    wheels = [(engine.directory, engine.manifest, engine.distribution) for engine in found]
    engines = list_engines(configured, installed=lambda: wheels)
    # Same choice as the supervisor makes, without running --version a second time.
    chosen = find_llama_server(configured, settings.variant, probe=lambda _binary: None,
                               installed=lambda: wheels)
    chosen_path = chosen.path.resolve() if chosen is not None else None
    if as_json:
        typer.echo(json.dumps(
            [_as_dict(e, e.path.resolve() == chosen_path) for e in engines], indent=2
        ))
        return
    if not engines:
        typer.echo("no llama-server found; run `lalo engine build`")
    else:
        rows = [("", "ORIGIN", "VARIANT", "VERSION", "PATCHES", "PATH")]
        for engine in engines:
            mark = "*" if engine.path.resolve() == chosen_path else ""
            patches = ",".join(p.split("-", 1)[0] for p in engine.patches) or "-"
            rows.append((mark, engine.origin_text, engine.variant or "-", engine.version or "?",
                         patches, str(engine.path)))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
                       + "  " + row[5])
        applied = sorted({p for e in engines for p in e.patches})
        if applied:
            typer.echo(f"patches (lalo's llama.cpp series, launcher/engines/patches/): "
                       f"{', '.join(applied)}")
    for item in skipped:
        typer.echo(f"skipped: the engine of {item.distribution}: {item.reason}")


def _as_dict(engine: FoundEngine, chosen: bool) -> dict[str, object]:
    return {
        "kind": engine.kind,
        "path": str(engine.path),
        "origin": engine.origin,
        "origin_text": engine.origin_text,
        "distribution": engine.distribution,
        "version": engine.version,
        "commit": engine.commit,
        "variant": engine.variant,
        "manifest": str(engine.manifest) if engine.manifest else None,
        "patches": list(engine.patches),
        "selected": chosen,
    }
