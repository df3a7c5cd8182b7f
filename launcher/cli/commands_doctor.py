"""`lalo doctor [--bench]`: what this machine can run, and how fast, before anything is pulled."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from launcher.cli.app import app


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    bench: Annotated[
        bool,
        typer.Option(
            "--bench",
            help="Measure each catalog model's decode speed on random weights of its shape.",
        ),
    ] = False,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="Only these catalog ids (repeatable); default: all.",
        ),
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", min=8, max=4096, help="Tokens to decode.")] = 64,
    repeats: Annotated[
        int, typer.Option("--repeats", min=1, max=20, help="Measured runs per model; the best counts.")
    ] = 3,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="Default: physical cores.")] = None,
    llama_server: Annotated[
        Path | None,
        typer.Option(
            "--llama-server",
            help="The llama-server to benchmark with (default: the registry's).",
        ),
    ] = None,
) -> None:
    """Hardware (cores, SIMD, RAM, disk), engines, and which catalog models fit now."""
    # Imported here: the benchmark machinery is heavy and other commands should start fast.
    from launcher.doctor.report import collect_report, format_report
    from launcher.doctor.speed import format_bench, run_bench
    from launcher.engines.registry import find_llama_server
    from launcher.errors import EngineError
    from launcher.models.catalog import default_catalog

    catalog = default_catalog()
    for model_id in model or ():
        catalog.get(model_id)  # unknown ids are a usage error before anything runs
    report = collect_report(catalog=catalog)
    payload: dict[str, object] = report.to_json()
    if not as_json:
        for line in format_report(report):
            typer.echo(line)
    if bench:
        engine = find_llama_server(str(llama_server) if llama_server else "auto")
        if engine is None:
            raise EngineError(
                "doctor --bench needs llama-server: run `lalo engine build` or pass --llama-server PATH"
            )
        # catalog models without a bench shape (the small real models in wheels) are left out
        entries = ([catalog.get(model_id) for model_id in model] if model
                   else [entry for entry in catalog if entry.bench_shape is not None])

        def note(message: str) -> None:
            typer.echo(f"bench: {message}", err=True)

        results = run_bench(entries, engine, tokens=tokens, threads=threads, repeats=repeats, note=note)
        payload["bench"] = {
            "engine": str(engine.path),
            "random_weights": True,
            "results": [asdict(result) for result in results],
        }
        if not as_json:
            typer.echo("")
            typer.echo(f"decode speed with {engine.path}:")
            for line in format_bench(results):
                typer.echo(line)
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
