"""`lalo service install|uninstall|status`: lalo as a systemd service (Linux)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from launcher.cli.app import app
from launcher.serve.service import UNIT_NAME, Service, make_spec

service_app = typer.Typer(
    name="service",
    help="Run lalo at boot as a systemd service (restarted on failure, drained on stop).",
    no_args_is_help=True,
)
app.add_typer(service_app, name="service")

UserOption = Annotated[bool, typer.Option(
    "--user", help="A user unit (~/.config/systemd/user), started when you log in or at boot "
                   "with `loginctl enable-linger`; without it a system unit (needs root).")]


@service_app.command("install")
def install(
    user: UserOption = False,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="The lalo.yaml the service uses (default: lalo's lookup order, "
                               "pinned in the unit).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the unit and where it would go; change nothing.")] = False,
) -> None:
    """Write the unit, enable it and start it now."""
    spec = make_spec(config, user)
    service = Service(user)
    if dry_run:
        typer.echo(f"# {service.path}")
        typer.echo(spec.text(), nl=False)
        return
    path = service.install(spec)
    scope = "--user " if user else ""
    typer.echo(f"installed {path}; enabled and started. Check it with `lalo service status"
               f"{' --user' if user else ''}` or `journalctl {scope}-u {UNIT_NAME}`")


@service_app.command("uninstall")
def uninstall(user: UserOption = False) -> None:
    """Stop and disable the service and remove its unit."""
    service = Service(user)
    if service.uninstall():
        typer.echo(f"removed {service.path}")
    else:
        typer.echo(f"no unit at {service.path}: nothing to remove")


@service_app.command("status")
def status(user: UserOption = False) -> None:
    """systemd's view of the service: active or not, since when, its last log lines."""
    typer.echo(Service(user).status())
