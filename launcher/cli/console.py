"""How every `lalo` command ends up on the console: logging set-up, errors as one line with
lalo's exit code, and a quiet exit when stdout was closed early. Both entry points use it (the
fast `lalo up` path in main.py and the typer app), so neither imports the other."""

from __future__ import annotations

import logging
import os
import sys


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def quiet_broken_pipe() -> None:
    """stdout was closed early (`lalo ... | head`): exit 1, not worth a traceback."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)


def fail(message: str, code: int) -> None:
    """One line on stderr and lalo's exit code: how every error ends the `lalo` command."""
    print(f"lalo: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
