"""`lalo engine build` and `lalo engine list`: build llama-server from llama.cpp source into the
user cache, and show every llama-server lalo can find.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TextIO

import typer

from launcher.cli.app import app
from launcher.config import load_config, resolve_path
from launcher.engines.builder import BuildProgress, build_engine
from launcher.engines.registry import FoundEngine, find_llama_server, list_engines
from launcher.units import format_size

engine_app = typer.Typer(
    name="engine",
    help="Build llama-server from llama.cpp source; list the engines lalo finds.",
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


class ProgressPrinter:
    """On a terminal one line rewritten in place; otherwise a line per stage and every 10 %."""

    def __init__(self, stream: TextIO, *, interactive: bool | None = None) -> None:
        self.stream = stream
        self.interactive = stream.isatty() if interactive is None else interactive
        self.reported = -10
        self.open_line = False

    def __call__(self, event: BuildProgress) -> None:
        if event.percent is None:
            self._line(f"{event.stage}: {event.message}")
            return
        if self.interactive:
            width = shutil.get_terminal_size((100, 20)).columns
            text = f"[{event.percent:3d}%] {event.message}"[: max(width - 1, 10)]
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
            self.open_line = True
        elif event.percent // 10 * 10 > self.reported:
            self.reported = event.percent // 10 * 10
            self._line(f"[{event.percent:3d}%] {event.message}")

    def _line(self, text: str) -> None:
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.open_line:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.open_line = False


@engine_app.command("build")
def build(
    variant: Annotated[
        VariantChoice,
        typer.Option(
            "--variant",
            help="native: tuned to this CPU, static. "
            "portable: runs on other CPUs of this OS/arch (CPU variant picked at run time). "
            "cuda: NVIDIA GPUs (needs the CUDA toolkit's nvcc; no GPU needed to build; "
            "cuBLAS from NVIDIA's PyPI wheel when the toolkit has none).",
        ),
    ] = VariantChoice.native,
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
) -> None:
    """Build llama-server and llama-quantize into lalo's cache (minutes; done once per version).

    On Linux the portable variant is compiled inside a Debian 11 root (made once with
    debootstrap; needs root) so that it runs on glibc 2.31 and later."""
    printer = ProgressPrinter(sys.stderr)
    started = time.monotonic()
    chosen = variant
    if platform is PlatformChoice.windows and variant is VariantChoice.native:
        chosen = VariantChoice.portable  # the only Windows build: say nothing, it is the default
    try:
        built = build_engine(chosen.value, source, jobs, printer, force=force,
                             cuda_archs=cuda_arch, platform_name=platform.value)
    finally:
        printer.close()
    if built.already_built:
        typer.echo(f"already built: {built.server}")
        return
    size = sum(f.size for f in built.manifest.files)
    typer.echo(
        f"built {built.key} in {_duration(time.monotonic() - started)} "
        f"({format_size(size)} installed): {built.server}"
    )


@engine_app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Config file whose engines.llama_server to honour."),
    ] = None,
) -> None:
    """Every llama-server found (configured, built, on PATH); * marks the one lalo uses."""
    loaded = load_config(config, check_files=False)
    settings = loaded.config.engines.llama_server
    configured = settings.path
    if configured != "auto":
        configured = str(resolve_path(configured, loaded.base_dir))
    engines = list_engines(configured)
    # Same choice as the supervisor makes, without running --version a second time.
    chosen = find_llama_server(configured, settings.variant, probe=lambda _binary: None)
    chosen_path = chosen.path.resolve() if chosen is not None else None
    if as_json:
        typer.echo(json.dumps(
            [_as_dict(e, e.path.resolve() == chosen_path) for e in engines], indent=2
        ))
        return
    if not engines:
        typer.echo("no llama-server found; run `lalo engine build`")
        return
    rows = [("", "ORIGIN", "VARIANT", "VERSION", "PATH")]
    for engine in engines:
        mark = "*" if engine.path.resolve() == chosen_path else ""
        rows.append((mark, engine.origin, engine.variant or "-", engine.version or "?",
                     str(engine.path)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
                   + "  " + row[4])


def _as_dict(engine: FoundEngine, chosen: bool) -> dict[str, object]:
    return {
        "kind": engine.kind,
        "path": str(engine.path),
        "origin": engine.origin,
        "version": engine.version,
        "commit": engine.commit,
        "variant": engine.variant,
        "manifest": str(engine.manifest) if engine.manifest else None,
        "selected": chosen,
    }


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"
