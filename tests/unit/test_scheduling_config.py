"""The scheduling keys of lalo.yaml: resources.max_wait and models.NAME.pinned."""

from __future__ import annotations

import pytest

from launcher.config import parse_config
from launcher.errors import ConfigError

GIB = 1024**3


def test_defaults_and_values() -> None:
    config = parse_config("models:\n  m: {file: m.gguf}\n", label="x", total_ram=8 * GIB)
    assert config.resources.max_wait == 10.0 and config.models["m"].pinned is False
    config = parse_config("resources: {max_wait: 2.5}\nmodels:\n  m: {file: m.gguf, pinned: true}\n",
                          label="x", total_ram=8 * GIB)
    assert config.resources.max_wait == 2.5 and config.models["m"].pinned is True


@pytest.mark.parametrize(("text", "message"), [
    ("resources:\n  max_wait: -1\n", "lalo.yaml:2: resources.max_wait: must be >= 0.0, got -1"),
    ("models:\n  m:\n    file: m.gguf\n    pinned: maybe\n", "lalo.yaml:4: models.m.pinned: "),
])
def test_bad_values_name_the_path(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, label="lalo.yaml", total_ram=8 * GIB)
    assert str(caught.value).startswith(message)
