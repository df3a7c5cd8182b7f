"""Each engine's command line, environment and probes; the llamafile `sh` handling."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from launcher.engines.base import ServerSettings
from launcher.engines.llama_cpp_python import LlamaCppPythonEngine
from launcher.engines.llama_server import LlamaServerEngine
from launcher.engines.llamafile import LlamafileEngine
from launcher.errors import EngineError


def settings(model: Path, **changes: object) -> ServerSettings:
    base = dict(model_path=model, host="127.0.0.1", port=41234, api_key="k3y", ctx_size=2048,
                parallel=2, threads=None)
    base.update(changes)
    return ServerSettings(**base)  # type: ignore[arg-type]


def test_llama_server_argv_env_and_probes(tmp_path: Path) -> None:
    spec = LlamaServerEngine(Path("/opt/llama-server")).launch_spec(
        settings(tmp_path / "m.gguf", threads=4, embeddings=True, extra_args=("--alias", "m"),
                 env={"X": "1"}))
    assert spec.argv == (
        "/opt/llama-server", "--model", str(tmp_path / "m.gguf"), "--host", "127.0.0.1",
        "--port", "41234", "--ctx-size", "2048", "--parallel", "2", "--metrics",
        "--threads", "4", "--embeddings", "--alias", "m",
    )
    assert spec.env == {"LLAMA_API_KEY": "k3y", "X": "1"}
    assert "k3y" not in " ".join(spec.argv)  # keys stay off the world-readable command line
    assert (spec.base_url, spec.ready_path, spec.health_path) == (
        "http://127.0.0.1:41234", "/health", "/health")
    assert spec.health_needs_key is False


def test_llama_cpp_python_argv_and_probe_on_models(tmp_path: Path) -> None:
    spec = LlamaCppPythonEngine(python="/usr/bin/python3").launch_spec(settings(tmp_path / "m.gguf"))
    assert spec.argv[:3] == ("/usr/bin/python3", "-m", "llama_cpp.server")
    assert spec.argv[3:] == ("--model", str(tmp_path / "m.gguf"), "--host", "127.0.0.1",
                             "--port", "41234", "--n_ctx", "2048")
    assert spec.env["API_KEY"] == "k3y"
    assert spec.ready_path == spec.health_path == "/v1/models"  # it has no /health
    assert spec.health_needs_key is True


def test_llamafile_runs_through_sh_with_server_on_the_command_line(tmp_path: Path) -> None:
    program = tmp_path / "model.llamafile"
    program.write_bytes(b"MZqFpD='\n")  # an APE file: execve() refuses it, sh runs it
    program.chmod(0o644)
    spec = LlamafileEngine().launch_spec(settings(program))
    assert spec.argv[0] == "/bin/sh" and spec.argv[1] == str(program.resolve())
    assert spec.argv[2] == "--server"  # 0.9.x picks server mode before reading .args
    assert "--model" not in spec.argv  # the weights are inside; its .args names them
    assert "--host" in spec.argv and spec.argv[spec.argv.index("--port") + 1] == "41234"
    assert stat.S_IMODE(program.stat().st_mode) == 0o755  # made executable
    assert spec.env["TMPDIR"]  # it unpacks its loader there


def test_llamafile_runtime_serves_a_plain_gguf(tmp_path: Path) -> None:
    runtime = tmp_path / "llamafile-0.10"
    runtime.write_bytes(b"MZqFpD='\n")
    model = tmp_path / "m.gguf"
    spec = LlamafileEngine(runtime=runtime).launch_spec(settings(model))
    assert spec.argv[:3] == ("/bin/sh", str(runtime.resolve()), "--server")
    assert spec.argv[spec.argv.index("--model") + 1] == str(model)
    with pytest.raises(EngineError, match=r"needs a \.llamafile, or engines\.llamafile\.runtime"):
        LlamafileEngine().launch_spec(settings(model))


def test_missing_llamafile_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="no such llamafile"):
        LlamafileEngine().launch_spec(settings(tmp_path / "absent.llamafile"))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell")
def test_sh_really_runs_an_ape_style_file(tmp_path: Path) -> None:
    """The first bytes of a llamafile are a shell-compatible prelude: `sh FILE` executes it."""
    import subprocess

    program = tmp_path / "fake.llamafile"
    program.write_text("MZqFpD='\n'\necho started with \"$@\"\nexit 0\n")
    spec = LlamafileEngine().launch_spec(settings(program))
    done = subprocess.run(list(spec.argv), capture_output=True, text=True, env={**os.environ, **spec.env})
    assert done.returncode == 0
    assert done.stdout.startswith("started with --server --api-key k3y --host 127.0.0.1")
