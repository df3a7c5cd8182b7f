"""The `lalo` console entry point: plain `lalo up` command lines skip the CLI framework.

`lalo up` is what client IT runs, and every moment before its model servers are spawned adds
to the time until they are ready. Importing typer (and its vendored click) took 40-60 ms of
the 0.3-0.5 s before the first spawn on this 2-core machine, so `parse_up` reads the common
`lalo up ...` command lines itself and `main` runs them directly. Anything it does not
recognise exactly (help, an unknown or repeated option, a value that needs an error message)
goes to the typer app, which stays the one definition of the command line: a unit test
checks that both parse every accepted form the same way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.cli.console import configure_logging, fail, quiet_broken_pipe
from launcher.errors import LaloError

if TYPE_CHECKING:
    from launcher.cli.up import UpRequest

# httpx imports its own command-line client on every `import httpx` when rich, pygments and
# click are installed (they come with typer and uvicorn): ~90 ms and several MB that lalo
# never uses. A None entry makes that optional import fail the way httpx expects.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
# pydantic looks for plugins (reading the entry points of every installed distribution) when
# the first model class is made: ~30 ms of `lalo up`'s start, and lalo's config models use no
# plugin. pydantic's documented switch; a value the user set stands. (Model servers inherit it;
# llama-cpp-python's server needs no pydantic plugin either.)
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

_VALUE_OPTIONS = {"--config": "config", "-c": "config", "--host": "host", "--port": "port",
                  "-p": "port"}
_FLAG_OPTIONS = {"--detach": "detach", "-d": "detach", "--demo": "demo",
                 "--insecure": "insecure"}
_VERBOSE = ("-v", "--verbose")


def parse_up(argv: Sequence[str]) -> tuple[bool, UpRequest] | None:
    """(verbose, the `up` options typer would pass) for a plain `lalo [-v] up ...` command
    line; None for anything else, which the typer app then parses (and explains, if wrong)."""
    args = list(argv)
    verbose = False
    if args and args[0] in _VERBOSE:
        verbose = True
        args.pop(0)
    if not args or args.pop(0) != "up":
        return None
    options: dict[str, Any] = {}
    while args:
        arg = args.pop(0)
        name, _, attached = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        value: Any
        if name in _FLAG_OPTIONS and "=" not in arg:
            key, value = _FLAG_OPTIONS[name], True
        elif name in _VALUE_OPTIONS:
            key = _VALUE_OPTIONS[name]
            if "=" in arg:
                raw = attached
            elif not args:
                return None
            else:
                raw = args.pop(0)
            parsed = _value(key, raw)
            if parsed is None:
                return None
            value = parsed
        else:
            return None  # help, short options run together, unknown options, arguments
        if key in options:
            return None  # typer decides what a repeated option means
        options[key] = value
    from launcher.cli.up import UpRequest

    return verbose, UpRequest(**options)


def _value(key: str, raw: str) -> Path | int | str | None:
    if not raw or raw.startswith("-"):
        return None
    if key == "config":
        return Path(raw)
    if key == "port":
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 65535:
            return None  # typer's message says what is wrong with it
        return int(raw)
    return raw


def main(argv: Sequence[str] | None = None) -> None:
    """Run `lalo` with `argv` (default: the process's arguments); exits with lalo's exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    parsed = parse_up(args)
    if parsed is None:
        from launcher.cli.app import main as typer_main

        typer_main(args)
        return
    verbose, request = parsed
    configure_logging(verbose)
    from launcher.cli.up import run_up

    try:
        code = run_up(request)
    except LaloError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except BrokenPipeError:
        quiet_broken_pipe()
    sys.exit(code)
