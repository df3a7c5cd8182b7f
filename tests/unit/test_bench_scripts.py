"""Every benchmark script runs from the development install (lalo with its `dev` extra): each
module it imports, at the top or inside a function, is installed, unless the import sits in a
`try` that handles ImportError (matplotlib, for one optional plot). A run cannot end in an
ImportError after minutes of measuring, losing its report."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def _guarded(node: ast.Try) -> bool:
    names = {"ImportError", "ModuleNotFoundError", "Exception"}
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if handler.type is None or any(isinstance(k, ast.Name) and k.id in names for k in kinds):
            return True
    return False


def required_imports(tree: ast.AST) -> set[str]:
    """Top-level module names imported outside an ImportError guard."""
    found: set[str] = set()

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Import) and not guarded:
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and not guarded:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            in_body = isinstance(node, ast.Try) and child in node.body and _guarded(node)
            visit(child, guarded or in_body)

    visit(tree, False)
    return found


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_script_imports_are_installed(script: str) -> None:
    modules = required_imports(ast.parse((BENCH / script).read_text(), script))
    local = {p.stem for p in BENCH.glob("*.py")} | {"launcher", "tests"}
    missing = sorted(m for m in modules - local - set(sys.stdlib_module_names)
                     if importlib.util.find_spec(m) is None)
    assert not missing, f"{script} imports {missing}: add them to an extra or guard the import"


def test_an_unguarded_import_is_found() -> None:
    tree = ast.parse("import a\ndef f():\n    try:\n        import b\n    except ImportError:\n"
                     "        pass\n    import c\n")
    assert required_imports(tree) == {"a", "c"}
