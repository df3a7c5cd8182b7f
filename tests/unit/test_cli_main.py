"""The `lalo` entry point's fast path for `lalo up`: it must parse exactly as the typer app does,
hand everything else to typer, and run `up` without importing typer."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import typer.main

from launcher.cli import main
from launcher.cli.app import _register, app
from launcher.cli.main import parse_up
from launcher.cli.up import UpRequest

ACCEPTED = [
    ["up"],
    ["up", "--demo"],
    ["-v", "up"],
    ["--verbose", "up", "--detach"],
    ["up", "-d", "--demo"],
    ["up", "--config", "lalo.yaml"],
    ["up", "--config=conf/lalo.yaml", "--port=9000"],
    ["up", "-c", "/abs/x.yaml", "-p", "1"],
    ["up", "--host", "0.0.0.0", "--port", "65535"],
    ["up", "--host=::1", "-p", "8081", "--detach", "--demo"],
    ["up", "--port", "08080"],
    ["up", "--host", "local=host"],
    ["up", "--host", "0.0.0.0", "--insecure"],
]

TO_TYPER = [
    [],
    ["--version"],
    ["status"],
    ["up", "--help"],
    ["up", "-h"],
    ["up", "--port", "0"],
    ["up", "--port", "65536"],
    ["up", "--port", "x"],
    ["up", "--port", "-1"],
    ["up", "--port", "٣"],  # a digit to str.isdigit, not to typer
    ["up", "-p"],
    ["up", "--config"],
    ["up", "--config="],
    ["up", "--demo", "--demo"],
    ["up", "-p", "1", "--port", "2"],
    ["up", "-dp", "8080"],
    ["up", "-p8080"],
    ["up", "-c=x.yaml"],
    ["up", "--demo=yes"],
    ["up", "--insecure=1"],
    ["up", "extra"],
    ["up", "--unknown"],
    ["up", "--", "--demo"],
    ["up", "--host", "-x"],
    ["up", "-v"],
    ["-v", "-v", "up"],
    ["plan", "up"],
]


def typer_parse(argv: list[str]) -> tuple[bool, UpRequest]:
    """What the typer app makes of a `lalo ... up ...` command line."""
    _register(["up"])
    group: Any = typer.main.get_command(app)
    ctx = group.make_context("lalo", list(argv))
    name, command, rest = group.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
    sub = command.make_context(name, rest, parent=ctx)
    return bool(ctx.params["verbose"]), UpRequest(**sub.params)


@pytest.mark.parametrize("argv", ACCEPTED, ids=" ".join)
def test_accepted_command_lines_parse_as_typer_parses_them(argv: list[str]) -> None:
    parsed = parse_up(argv)
    assert parsed is not None, "the fast path should take this command line"
    assert parsed == typer_parse(argv)


@pytest.mark.parametrize("argv", TO_TYPER, ids=lambda a: " ".join(a) or "(none)")
def test_anything_else_goes_to_typer(argv: list[str]) -> None:
    assert parse_up(argv) is None


def test_the_fast_path_knows_every_option_of_up() -> None:
    """An option added to `up` in typer and not here would send every `lalo up` using it
    through typer: correct, but slower."""
    _register(["up"])
    group: Any = typer.main.get_command(app)
    typer_names = {opt for param in group.commands["up"].params for opt in param.opts}
    assert typer_names == set(main._VALUE_OPTIONS) | set(main._FLAG_OPTIONS)
    tested = {a.split("=")[0] for argv in ACCEPTED for a in argv if a.startswith("-")}
    assert typer_names <= tested, "every option should appear in ACCEPTED"
    assert {f.name for f in dataclasses.fields(UpRequest)} == {
        param.name for param in group.commands["up"].params}


def run_lalo(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`lalo ARGS` in a new Python; it prints whether typer was imported by the time it exited."""
    code = textwrap.dedent(f"""
        import atexit, sys
        atexit.register(lambda: print("typer imported:", "typer" in sys.modules))
        from launcher.cli.main import main
        main({args!r})
    """)
    env = {"LALO_STATE_DIR": str(tmp_path / "state"), "LALO_CONFIG_DIR": str(tmp_path / "cfg"),
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def test_up_runs_without_typer_and_reports_errors_like_the_typer_app(tmp_path: Path) -> None:
    bad = tmp_path / "lalo.yaml"
    bad.write_text("models:\n  m:\n    file: missing.gguf\n    ctx_size: 0\n")
    fast = run_lalo(["up", "--config", str(bad)], tmp_path)
    assert fast.returncode == 2, fast.stderr
    assert "typer imported: False" in fast.stdout
    slow = run_lalo(["-v", "-v", "up", "--config", str(bad)], tmp_path)  # through typer
    assert "typer imported: True" in slow.stdout
    assert fast.stderr.startswith("lalo: error: ")
    assert fast.stderr.strip().splitlines()[-1] == slow.stderr.strip().splitlines()[-1]
    assert slow.returncode == 2


def test_usage_errors_of_up_still_get_typers_message(tmp_path: Path) -> None:
    # the config is broken too: were port 0 ever taken by the fast path, `lalo up` would end
    # at once on the config (without typer's usage line) instead of starting to serve
    bad = tmp_path / "lalo.yaml"
    bad.write_text("models: 3\n")
    result = run_lalo(["up", "--config", str(bad), "--port", "0"], tmp_path)
    assert result.returncode == 2
    assert "--port" in result.stderr and "Usage: lalo up" in result.stderr
