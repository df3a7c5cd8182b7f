"""A model's `args` (and `env`) that change llama-server's memory: refused at load with one line
naming the setting to use, or read into the plan, so the plan never counts another server than
the one lalo starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config import parse_config
from launcher.config.server_args import ArgsMemory, read_args, refused_arg
from launcher.errors import ConfigError
from launcher.models.catalog import default_catalog
from launcher.placement.estimate import MemorySettings, estimate_for, estimate_memory

MIB = 1024**2
SMOL = default_catalog().get("smollm2-135m-instruct").facts()
GEMMA = default_catalog().get("gemma-3-270m").facts()


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, label="lalo.yaml")
    return str(caught.value)


@pytest.mark.parametrize(("args", "setting"), [
    ("[-c, '4096']", "ctx_size"), ("[--ctx-size=4096]", "ctx_size"),
    ("[-np, '4']", "parallel"), ("[--parallel, '4']", "parallel"),
    ("[-ctk, q8_0]", "kv_cache"), ("[--cache-type-v, q4_0]", "kv_cache"),
    ("[-ngl, '99']", "gpu_layers"), ("[--n-gpu-layers, '99']", "gpu_layers"),
    ("[-t, '4']", "threads"), ("[--threads, '4']", "threads"),
    ("[-m, other.gguf]", "file"),
])
def test_args_lalo_sets_itself_are_refused_naming_the_setting(args: str, setting: str) -> None:
    message = error_of(f"models:\n  smol:\n    file: m.gguf\n    args: {args}\n")
    flag = args.strip("[]").split(",")[0]
    assert message.startswith(f"lalo.yaml:4: models.smol.args: {flag} sets ")
    assert message.endswith(f": use models.smol.{setting} instead")
    assert "\n" not in message


def test_the_line_of_the_refused_argument_is_named() -> None:
    text = "models:\n  smol:\n    file: m.gguf\n    args:\n      - --jinja\n      - -c\n      - '8192'\n"
    assert error_of(text).startswith("lalo.yaml:6: models.smol.args: -c sets the context size")


@pytest.mark.parametrize(("args", "says"), [
    ("[-fa, 'on']", "-fa sets flash attention, which follows models.m.kv_cache"),
    ("[--flash-attn, 'off']", "--flash-attn sets flash attention, which follows models.m.kv_cache"),
    ("[--fit, 'off']", "--fit sets llama-server's fit: use models.m.gpu_layers: fit instead"),
    ("[-kvu]", "-kvu changes memory, and lalo runs one KV stream per slot"),
    ("[--mmproj, p.gguf]", "--mmproj changes memory, and lalo's plan does not count a second "
                           "model file"),
    ("[-md, d.gguf]", "-md changes memory"),
    ("[-ub, many]", "-ub needs a positive number, got 'many'"),
    ("[-b]", "-b needs a positive number, got None"),
    ("[-ctxcp, '-1']", "-ctxcp needs a count from 0, got '-1'"),
])
def test_memory_args_lalo_cannot_count_are_refused(args: str, says: str) -> None:
    message = error_of(f"models:\n  m:\n    file: m.gguf\n    args: {args}\n")
    assert message.startswith(f"lalo.yaml:4: models.m.args: {says}"), message


def test_env_that_would_change_memory_is_refused() -> None:
    message = error_of("models:\n  m:\n    file: m.gguf\n    env: {LLAMA_ARG_CACHE_TYPE_K: q8_0}\n")
    assert message == ("lalo.yaml:4: models.m.env: LLAMA_ARG_CACHE_TYPE_K changes what lalo "
                       "planned: use models.m.kv_cache instead")
    message = error_of("models:\n  m:\n    file: m.gguf\n    env: {LLAMA_ARG_UBATCH: '64'}\n")
    assert message.endswith("LLAMA_ARG_UBATCH changes what lalo planned: use args (-ub N) instead")
    # others pass (OpenMP, CUDA, the model's own variables)
    parse_config("models:\n  m: {file: m.gguf, env: {OMP_PROC_BIND: 'true'}}\n", label="x")


def test_llama_cpp_python_flags_are_checked_by_their_own_names() -> None:
    message = error_of("models:\n  m:\n    file: m.gguf\n    engine: llama-cpp-python\n"
                       "    args: [--n_ctx, '4096']\n")
    assert message == ("lalo.yaml:5: models.m.args: --n_ctx sets the context size: use "
                       "models.m.ctx_size instead")
    # llama-server's -c means nothing to it: passed through as given
    assert refused_arg(("-c", "1"), "m", python=True) is None


def test_other_args_pass_unchanged() -> None:
    config = parse_config("models:\n  m: {file: m.gguf, args: [--jinja, --temp, '0.2', "
                          "--pooling, mean, -ts, '3']}\n", label="x")
    assert config.models["m"].args == ("--jinja", "--temp", "0.2", "--pooling", "mean", "-ts", "3")
    assert read_args(config.models["m"].args) == ArgsMemory()


def test_args_lalo_can_count_are_read_into_the_plan() -> None:
    assert read_args(["-ub", "256"]).ubatch == 256
    assert read_args(["--batch-size=128", "-ub", "256"]).ubatch == 128  # n_ubatch <= n_batch
    assert read_args(["--swa-full"]).swa_full and not read_args(["-nr"]).repack
    assert read_args(["-ctxcp", "1"]).checkpoints == 1 and read_args(["-ctxcp", "32"]).checkpoints == 3

    def estimate(facts: object, args: str) -> object:
        cfg = parse_config(f"models:\n  m: {{file: m.gguf, ctx_size: 8192, args: {args}}}\n",
                           label="x").models["m"]
        return estimate_for(facts, MemorySettings.of(cfg), frozenset({"Q4_K"}))  # type: ignore[arg-type]

    plain = estimate_memory(GEMMA, 8192, 1, repack_types=frozenset({"Q4_K"}))
    assert estimate(GEMMA, "[]") == plain
    # --swa-full: the 15 sliding layers keep the whole context too, and no checkpoints are made
    full = estimate(GEMMA, "[--swa-full]")
    assert full.kv_cache == 18 * 8192 * 256 * 2 * 2 and full.checkpoints == 0  # type: ignore[attr-defined]
    assert plain.kv_cache == (3 * 8192 + 15 * 1024) * 256 * 2 * 2
    # -ub: the compute graph (and the sliding layers' cells) follow the micro-batch
    small = estimate(GEMMA, "[-ub, '128']")
    assert small.compute < plain.compute and small.kv_cache < plain.kv_cache  # type: ignore[attr-defined]
    # --no-repack: no interleaved copy; -ctxcp 0: no checkpoints
    assert estimate(GEMMA, "[--no-repack]").repacked == 0 < plain.repacked  # type: ignore[attr-defined]
    assert estimate(GEMMA, "[-ctxcp, '0']").checkpoints == 0 < plain.checkpoints  # type: ignore[attr-defined]
    assert MemorySettings.of(parse_config(
        "models:\n  m: {file: m.gguf, kv_cache: q8_0, args: [-ub, '256', --swa-full]}\n",
        label="x").models["m"]).key() == "kv=q8_0|ub=256|swa-full"


def test_a_refused_arg_is_exit_2_from_the_cli(tmp_path: Path) -> None:
    config = tmp_path / "lalo.yaml"
    config.write_text("models:\n  a:\n    file: x.gguf\n    args: [-ctk, q8_0]\n")
    done = subprocess.run([sys.executable, "-m", "launcher", "plan", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == (f"lalo: error: {config}:4: models.a.args: -ctk sets the KV cache "
                           "type: use models.a.kv_cache instead\n")


def test_llama_cpp_python_gets_no_quantized_cache_through_args() -> None:
    refused = refused_arg(("--type_k", "8"), "m", python=True)
    assert refused is not None and refused[1].startswith("--type_k changes memory")
