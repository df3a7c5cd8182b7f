"""Marshal output that depends on the code alone, so a frozen lalo is the same byte for byte
wherever it is frozen.

CPython's marshal formats 3 and 4 depend on the state of the process that writes them:
- an object is flagged for back-reference only when its reference count is above one;
- a string is written as interned when that process has interned it.

PyInstaller marshals every module it packs in its own process. That process differs with the
path of the checkout it freezes. Here, the same source frozen from two paths gave two
`base_library.zip`s: the one-character string "?" in `encodings/punycode.pyc` and
`re/_parser.pyc` was interned in one freeze and not in the other.

Format 2 has no back-references and no interned flag, so its bytes depend on the value alone.
CPython reads it as it reads any other format. A code object interns its names when it is
made, so the loaded modules are the same.

What it costs, measured on lalo's one-folder app:
- `base_library.zip` (155 modules, stored uncompressed) is 20% larger: 1.44 to 1.73 MB;
- the `lalo` executable, which holds the other modules zlib-compressed, 1.9% larger: 15.5 to
  15.8 MB;
- loading the 155 modules takes 0.8 ms more (3.7 ms instead of 2.8 ms).

`install()` is called by `build/lalo-ai.spec` inside PyInstaller's process, before the analysis;
a PyInstaller it cannot patch gives a build warning, not a failed build.
"""

from __future__ import annotations

import importlib
import marshal
import sys
from typing import IO, Any

VERSION = 2
version = VERSION  # as `marshal.version`, for any reader of it

# PyInstaller's modules that marshal code: base_library.zip and collected .pyc files
# (building.utils), the PYZ and the scripts in the executable's archive (archive.writers).
PYINSTALLER_MODULES = ("PyInstaller.building.utils", "PyInstaller.archive.writers")

loads = marshal.loads
load = marshal.load


def dumps(value: Any, _version: int = VERSION, /) -> bytes:
    """`marshal.dumps` in format 2, whatever version the caller asked for."""
    return marshal.dumps(value, VERSION)


def dump(value: Any, file: IO[bytes], _version: int = VERSION, /) -> None:
    """`marshal.dump` in format 2, whatever version the caller asked for."""
    marshal.dump(value, file, VERSION)


def install() -> str | None:
    """Make PyInstaller's marshalling modules use this module as their `marshal`. None when
    done; else the warning for the build (the freeze still works, but two freezes may differ):
    a PyInstaller release no longer marshals through a module-level `marshal`."""
    this = sys.modules[__name__]
    for name in PYINSTALLER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            module = None
        found = getattr(module, "marshal", None)
        if found is this:
            continue
        if module is None or found is not marshal:
            return (f"this PyInstaller has no module-level `marshal` in {name}: lalo could not "
                    "make its marshalled code independent of the freezing process, so two "
                    "freezes of the same source may differ (stable_marshal.py)")
        module.marshal = this  # type: ignore[attr-defined]
    return None
