"""Entry script of the frozen lalo (`lalo-ai`, a bundle's `lalo/lalo`); see build/lalo-ai.spec."""

from launcher.packaging.frozen.entry import main


def _lalo(args: list[str]) -> object:
    from launcher.cli.main import main as lalo_main  # after the entry's fast paths (probe, seed)

    return lalo_main(args)


main(_lalo)
