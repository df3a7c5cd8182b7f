"""Code marshalled by a frozen build: the same bytes whatever the freezing process holds
(launcher/packaging/frozen/stable_marshal.py)."""

from __future__ import annotations

import importlib
import marshal
import subprocess
import sys

import pytest

from launcher.packaging.frozen import stable_marshal

SOURCE = "def ask(text):\n    return text.split('?')\n"
SCRIPT = f"""
import marshal, sys
from launcher.packaging.frozen import stable_marshal
if sys.argv[1] == "interned":
    sys.intern("?")  # what a PyInstaller process did or not, with the checkout's path
code = compile({SOURCE!r}, "ask.py", "exec")
print(marshal.dumps(code).hex(), stable_marshal.dumps(code).hex())
"""


def dumps_in(state: str) -> tuple[str, str]:
    """(format 4, stable) bytes of SOURCE's code, marshalled in a fresh process in `state`."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, state], capture_output=True,
                          text=True, check=True)
    plain, stable = done.stdout.split()
    return plain, stable


def test_the_same_code_gives_the_same_bytes_whatever_the_process_interned() -> None:
    plain_fresh, stable_fresh = dumps_in("fresh")
    plain_interned, stable_interned = dumps_in("interned")
    # The hazard: format 4 writes "?" as interned in one process and not in the other.
    assert plain_fresh != plain_interned
    assert stable_fresh == stable_interned
    # ... and what it writes loads back as the same code, with its names interned.
    loaded = marshal.loads(bytes.fromhex(stable_fresh))
    assert loaded == compile(SOURCE, "ask.py", "exec", dont_inherit=True)
    function = next(c for c in loaded.co_consts if hasattr(c, "co_names"))
    assert sys.intern(str(function.co_names[0])) is function.co_names[0]


def test_dump_writes_format_2_whatever_version_is_asked(tmp_path: pytest.TempPathFactory) -> None:
    code = compile(SOURCE, "ask.py", "exec", dont_inherit=True)
    assert stable_marshal.dumps(code, 4) == marshal.dumps(code, 2) != marshal.dumps(code, 4)
    path = tmp_path / "ask.bin"  # type: ignore[operator]
    with open(path, "wb") as file:
        stable_marshal.dump(code, file, 4)
    assert path.read_bytes() == marshal.dumps(code, 2)


def test_install_makes_pyinstaller_marshal_through_it(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("PyInstaller", reason="pip install 'lalo-launcher[packaging]'")
    modules = [importlib.import_module(name) for name in stable_marshal.PYINSTALLER_MODULES]
    for module in modules:
        monkeypatch.setattr(module, "marshal", marshal)  # restored after the test
    assert stable_marshal.install() is None
    assert stable_marshal.install() is None  # twice is harmless
    assert all(module.marshal is stable_marshal for module in modules)


@pytest.mark.parametrize("name", ["json", "no_such_pyinstaller_module"])
def test_a_pyinstaller_that_marshals_another_way_gets_a_warning_not_a_failure(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setattr(stable_marshal, "PYINSTALLER_MODULES", (name,))
    warning = stable_marshal.install()
    assert warning is not None and f"no module-level `marshal` in {name}" in warning
    assert "two freezes of the same source may differ" in warning
