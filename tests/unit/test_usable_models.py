"""One model's trouble is its own: what `lalo up` does with models it cannot serve."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config import ModelConfig
from launcher.errors import StartupError
from launcher.placement.resolve import ResolvedModel
from launcher.serve.prepare import usable_models


def resolved(name: str, path: Path | None, error: str | None = None,
             catalog: str | None = None) -> ResolvedModel:
    config = ModelConfig(catalog=catalog) if catalog else ModelConfig(file=str(path))
    return ResolvedModel(name=name, config=config, path=path, info=None, facts=None,
                         estimate=None, error=error)


def test_a_catalog_model_without_a_file_is_failed_with_the_command_that_fixes_it(
    tmp_path: Path
) -> None:
    models = usable_models([resolved("good", tmp_path / "a.gguf"),
                            resolved("qwen", None, catalog="qwen2.5-0.5b-instruct")])
    assert models[0].error is None
    assert models[1].error is not None
    assert "`lalo models pull qwen2.5-0.5b-instruct`" in models[1].error


def test_nothing_at_all_to_serve_is_a_startup_error_with_every_reason(tmp_path: Path) -> None:
    with pytest.raises(StartupError) as caught:
        usable_models([resolved("bad", tmp_path / "b.gguf", error="truncated GGUF file"),
                       resolved("qwen", None, catalog="qwen2.5-0.5b-instruct")])
    assert caught.value.exit_code == 3
    message = str(caught.value)
    assert "bad: truncated GGUF file" in message and "lalo models pull qwen2.5" in message
    assert usable_models([]) == []  # no models configured is not "nothing can be served"
