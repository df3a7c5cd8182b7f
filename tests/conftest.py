"""Fixtures shared by unit and integration tests: isolated lalo dirs and generated models."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.models.synthetic import SHAPES, ModelShape, write_synthetic_model
from tests.support.lalo import lalo_env

SMALL = SHAPES["demo"]  # 6M parameters, 12 MB in F16: loads in well under a second


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """State and config dirs of this test only (the engine cache stays shared)."""
    state, config = tmp_path / "state", tmp_path / "config"
    monkeypatch.setenv("LALO_STATE_DIR", str(state))
    monkeypatch.setenv("LALO_CONFIG_DIR", str(config))
    monkeypatch.delenv("LALO_CONFIG", raising=False)
    monkeypatch.delenv("LALO_API_KEYS", raising=False)
    return lalo_env(state, config)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def _model(directory: Path, name: str, shape: ModelShape, seed: int) -> Path:
    path = directory / f"{name}.gguf"
    if not path.exists():
        write_synthetic_model(path, shape, tensor_type="F16", seed=seed,
                              name=f"lalo test {name} (random weights)")
    return path


@pytest.fixture(scope="session")
def small_model(model_dir: Path) -> Path:
    return _model(model_dir, "small-a", SMALL, 1)


@pytest.fixture(scope="session")
def small_model_b(model_dir: Path) -> Path:
    return _model(model_dir, "small-b", SMALL, 2)


@pytest.fixture(scope="session")
def small_model_c(model_dir: Path) -> Path:
    return _model(model_dir, "small-c", SMALL, 3)


@pytest.fixture(scope="session")
def corrupt_model(model_dir: Path, small_model: Path) -> Path:
    """A valid GGUF header whose tensor data is cut short: llama-server refuses it."""
    path = model_dir / "corrupt.gguf"
    data = small_model.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
