"""Virtual environments as a newcomer makes them: `python3 -m venv` with the pip it brings (no
upgrade), or one without pip at all (`uv venv`, `python3 -m venv --without-pip`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def stock_python() -> Path:
    """The Python this test suite's venv was made from: the `python3` a README reader runs."""
    return Path(sys.base_prefix) / "bin" / "python3"


def make_venv(path: Path, *, with_pip: bool = True) -> Path:
    """`python3 -m venv PATH` (its stock pip, not upgraded); the venv's python."""
    argv = [str(stock_python()), "-m", "venv", *([] if with_pip else ["--without-pip"]), str(path)]
    subprocess.run(argv, check=True, capture_output=True, timeout=300)
    return path / "bin" / "python"


def pip_version(python: Path) -> str:
    done = subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True, text=True,
                          check=True, timeout=60)
    return done.stdout.split()[1]
