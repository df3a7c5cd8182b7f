"""The llama-cpp-python engine (`python -m llama_cpp.server`) started by lalo and answering."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import openai
import pytest

from tests.support.lalo import LaloUp, write_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python not installed (scripts/test.sh installs the extra)"),
]


def test_llama_cpp_python_engine_starts_and_answers(
    tmp_path: Path, isolated: dict[str, str], small_model: Path,
) -> None:
    config = write_config(tmp_path / "lalo.yaml", {
        "py": {"file": str(small_model), "engine": "llama-cpp-python", "ctx_size": 512},
    }, supervisor={"load_timeout": 300})
    with LaloUp(config, isolated) as up:
        model = up.wait_state("py", "ready", timeout=300)
        assert model["engine"] == "llama-cpp-python"
        api = openai.OpenAI(base_url=up.url + "/v1", api_key="x", max_retries=0, timeout=120)
        reply = api.completions.create(model="py", prompt="hello", max_tokens=4)
        assert reply.choices[0].text is not None
        assert reply.usage is not None and reply.usage.completion_tokens > 0
