"""Entry script of the frozen lalo (`lalo-ai`, a bundle's `lalo/lalo`); see build/lalo-ai.spec."""

from launcher.packaging.frozen.entry import main

main()
