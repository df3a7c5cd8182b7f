"""What the frozen lalo does before lalo's CLI: find the bundle, set lalo's variables (never
overriding the caller's), and fall back to the temp dir when HOME is unusable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launcher.packaging.formats.payload import PayloadFile, append_payload
from launcher.packaging.frozen.entry import (
    BUNDLE_DIR_ENV,
    CONFIG_ENV,
    EMBEDDED_DIR,
    ENGINE_DIR_ENV,
    MODELS_DIR_ENV,
    bundle_root,
    cli_arguments,
    prepare_environment,
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("LALO_STATE_DIR", "LALO_CACHE_DIR", "LALO_CONFIG_DIR", "XDG_STATE_HOME",
                 "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    return home


def one_file_layout(tmp_path: Path, embedded_models: bool) -> tuple[Path, Path]:
    """`dist/lalo-ai` and its extraction dir `_MEIxxxx/lalo_bundle/`."""
    exe = tmp_path / "dist" / "lalo-ai"
    exe.parent.mkdir()
    exe.write_bytes(b"")
    meipass = tmp_path / "_MEI123"
    (meipass / EMBEDDED_DIR).mkdir(parents=True)
    (meipass / EMBEDDED_DIR / "lalo.yaml").write_text("models: {}\n")
    if embedded_models:
        (meipass / EMBEDDED_DIR / "models").mkdir()
    return exe, meipass


def test_one_file_binary_with_embedded_models(tmp_path: Path, home: Path) -> None:
    exe, meipass = one_file_layout(tmp_path, embedded_models=True)
    env: dict[str, str] = {}
    root = prepare_environment(env, exe, str(meipass))
    assert root == meipass / EMBEDDED_DIR
    assert env[BUNDLE_DIR_ENV] == str(root)
    assert env[CONFIG_ENV] == str(root / "lalo.yaml")
    assert env[MODELS_DIR_ENV] == str(root / "models")
    assert "LALO_STATE_DIR" not in env  # HOME works: lalo's usual dirs
    assert (home / ".local" / "state" / "lalo").is_dir()


def test_one_file_binary_with_models_beside_it(tmp_path: Path, home: Path) -> None:
    exe, meipass = one_file_layout(tmp_path, embedded_models=False)
    env: dict[str, str] = {}
    prepare_environment(env, exe, str(meipass))
    assert env[MODELS_DIR_ENV] == str(tmp_path / "dist" / "lalo-ai-models")


def test_bundle_folder_is_found_from_the_frozen_lalo_inside_it(tmp_path: Path, home: Path) -> None:
    bundle = tmp_path / "lalo-ai"
    (bundle / "lalo").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "lalo.yaml").write_text("models: {}\n")
    env: dict[str, str] = {}
    assert prepare_environment(env, bundle / "lalo" / "lalo", str(bundle / "lalo" / "_internal")) \
        == bundle
    assert env[CONFIG_ENV] == str(bundle / "lalo.yaml")
    assert env[MODELS_DIR_ENV] == str(bundle / "models")


def test_the_callers_settings_win(tmp_path: Path, home: Path) -> None:
    exe, meipass = one_file_layout(tmp_path, embedded_models=True)
    env = {CONFIG_ENV: "/my/lalo.yaml", "LALO_STATE_DIR": str(tmp_path / "mine")}
    prepare_environment(env, exe, str(meipass))
    assert env[CONFIG_ENV] == "/my/lalo.yaml"
    assert env["LALO_STATE_DIR"] == str(tmp_path / "mine")


def test_no_bundle_leaves_the_config_lookup_alone(tmp_path: Path, home: Path) -> None:
    env: dict[str, str] = {}
    assert bundle_root(tmp_path / "bin" / "lalo", None) is None
    assert prepare_environment(env, tmp_path / "bin" / "lalo", None) is None
    assert CONFIG_ENV not in env and BUNDLE_DIR_ENV not in env


@pytest.mark.parametrize("home_value", ["/proc/no-such-home", "/dev/null"])
def test_unusable_home_puts_lalos_files_in_the_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home_value: str
) -> None:
    monkeypatch.setenv("HOME", home_value)
    for name in ("LALO_STATE_DIR", "LALO_CACHE_DIR", "LALO_CONFIG_DIR", "XDG_STATE_HOME",
                 "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    exe, meipass = one_file_layout(tmp_path, embedded_models=True)
    env: dict[str, str] = {}
    prepare_environment(env, exe, str(meipass), temp_root=tmp_path / "tmp")
    assert Path(env["LALO_STATE_DIR"]).parent.parent == tmp_path / "tmp"
    assert env["LALO_STATE_DIR"].endswith("/state")
    assert env["LALO_CACHE_DIR"].endswith("/cache")
    assert env["LALO_CONFIG_DIR"].endswith("/config")


def test_no_arguments_means_up() -> None:
    assert cli_arguments([]) == ["up"]
    assert cli_arguments(["--help"]) == ["--help"]
    assert cli_arguments(["up", "--port", "9000"]) == ["up", "--port", "9000"]


def test_payload_is_extracted_into_the_cache_only_when_needed(tmp_path: Path, home: Path) -> None:
    exe, meipass = one_file_layout(tmp_path, embedded_models=False)
    exe.write_bytes(b"\x7fELF stand-in")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    append_payload(exe, exe, "lalo-ai", [
        PayloadFile("engine/bin/llama-server", exe, "", 0o755),
        PayloadFile("models/m.gguf", model, "", 0o644),
    ])
    env: dict[str, str] = {}
    prepare_environment(env, exe, str(meipass), extract=False)  # e.g. --version
    assert not (home / ".cache" / "lalo" / "payloads").exists()
    assert env[MODELS_DIR_ENV] == str(tmp_path / "dist" / "lalo-ai-models")
    env = {}
    prepare_environment(env, exe, str(meipass))
    [folder] = (home / ".cache" / "lalo" / "payloads").iterdir()
    assert env[ENGINE_DIR_ENV] == str(folder / "engine" / "bin")
    assert env[MODELS_DIR_ENV] == str(folder / "models")
    assert (folder / "models" / "m.gguf").read_bytes() == b"GGUF"


def _self_check_without(module: str) -> subprocess.CompletedProcess[str]:
    """`self_check()` in a fresh interpreter in which importing `module` fails, as in a Python
    built without that extension (CI's frozen lalo had no _sqlite3)."""
    script = (
        "import sys\n"
        f"sys.modules[{module!r}] = None\n"
        "from launcher.packaging.frozen.entry import self_check\n"
        "sys.exit(self_check())\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False, cwd=Path(__file__).resolve().parents[2])


def test_self_check_fails_on_a_missing_stdlib_extension() -> None:
    done = _self_check_without("_sqlite3")
    assert done.returncode == 1
    assert "launcher.proxy.activity" in done.stderr
    assert "modules do not import" in done.stderr


def test_self_check_accepts_what_the_single_binary_leaves_out() -> None:
    done = _self_check_without("numpy")
    assert done.returncode == 0, done.stderr
    assert "modules import" in done.stdout
