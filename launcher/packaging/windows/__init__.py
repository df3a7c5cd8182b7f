"""The Windows package made on Linux: the launcher (launcher.c), its presets and RAM table,
and the NSIS installer."""
