"""`python -m launcher` is the `lalo` command."""

from launcher.cli.main import main

main()
