"""`python -m launcher` is the `lalo` command."""

from launcher.cli.app import main

main()
