"""The `lalo` command: builds the typer app from one module per command group, maps errors to exit codes."""

from __future__ import annotations

import sys

import typer
from typer.exceptions import TyperException

from launcher import __version__
from launcher.cli.console import configure_logging, fail, quiet_broken_pipe
from launcher.errors import LaloError

app = typer.Typer(
    name="lalo",
    help="Run local llama.cpp models behind one OpenAI-compatible port, sized to this machine's RAM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lalo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what lalo does to stderr."),
) -> None:
    configure_logging(verbose)


# Which module defines each command: `lalo up` imports only what `up` needs (start-up time
# and the supervisor's memory both count); help and unknown commands import them all.
_COMMAND_MODULES = {
    "up": "commands_run", "down": "commands_run", "reload": "commands_run",
    "status": "commands_run",
    "logs": "commands_run", "plan": "commands_inspect", "inspect": "commands_inspect",
    "engine": "commands_engine", "models": "commands_models", "doctor": "commands_doctor",
    "build": "commands_build", "service": "commands_service",
}


def _register(argv: list[str] | None = None) -> None:
    """Import the command modules (each adds its commands to `app`)."""
    import importlib

    words = [arg for arg in (sys.argv[1:] if argv is None else argv) if not arg.startswith("-")]
    wanted = _COMMAND_MODULES.get(words[0]) if words else None
    for module in sorted(set(_COMMAND_MODULES.values())) if wanted is None else [wanted]:
        importlib.import_module(f"launcher.cli.{module}")


def main(argv: list[str] | None = None) -> None:
    """Run the typer app: one clear line on stderr and the error's exit code, never a traceback.
    (The console script is `launcher.cli.main.main`, which calls this for all but plain `up`.)"""
    _register(argv)
    try:
        result = app(args=argv, standalone_mode=False, prog_name="lalo")
    except LaloError as exc:
        fail(str(exc), exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        fail("interrupted", 130)
    except TyperException as exc:  # usage errors: typer prints them with the usage line
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        sys.exit(int(getattr(exc, "exit_code", 2)))
    except BrokenPipeError:
        quiet_broken_pipe()
    sys.exit(result if isinstance(result, int) else 0)
