"""The memory estimate against the RSS of a real llama-server after a request that fills the context."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest

from launcher.engines.base import ServerSettings
from launcher.engines.llama_server import LlamaServerEngine
from launcher.models.gguf_file import read_gguf
from launcher.models.shape import ModelFacts
from launcher.models.synthetic import ModelShape, write_synthetic_model
from launcher.placement.estimate import estimate_memory
from launcher.supervisor import platform
from launcher.supervisor.logs import ModelLog
from launcher.supervisor.process import ManagedModel

pytestmark = pytest.mark.integration

# ~190M parameters: 100 MB and more even at Q4_0 (the size the 10 % target is about)
SHAPE = ModelShape(n_embd=768, n_layer=22, n_head=12, n_head_kv=4, n_ff=2048, n_vocab=32000,
                   tie_embeddings=False)


@pytest.fixture(scope="module", params=["Q8_0", "Q4_0"])
def model_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("estimate") / f"m-{request.param}.gguf"
    return write_synthetic_model(path, SHAPE, tensor_type=request.param)


@pytest.mark.parametrize("ctx_size", [1024, 4096])
def test_estimate_within_10_percent_of_measured_rss(
    llama_server_bin: Path, model_file: Path, ctx_size: int, tmp_path: Path,
) -> None:
    info = read_gguf(model_file)
    assert info.file_size >= 100 * 1000**2
    check_estimate(llama_server_bin, model_file, ctx_size, tmp_path, n_vocab=SHAPE.n_vocab)


@pytest.mark.parametrize("ctx_size", [2048, 8192])
@pytest.mark.parametrize("model_id", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_estimate_of_the_real_models_within_10_percent(
    llama_server_bin: Path, model_id: str, ctx_size: int, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    # SmolLM2: llama, every layer at the whole context; Gemma 3: 15 of 18 layers slide over 512
    # tokens (bench/calibrate_estimate.py also runs ctx 32768, too slow for the suite)
    path = request.getfixturevalue("smollm2" if model_id.startswith("smollm2") else "gemma3")
    check_estimate(llama_server_bin, path, ctx_size, tmp_path, n_vocab=read_gguf(path).vocab_size)


@pytest.mark.parametrize(("model_id", "kv_cache"), [("smollm2-135m-instruct", "q8_0"),
                                                   ("gemma-3-270m", "q4_0")])
def test_estimate_with_a_quantized_kv_cache_within_5_percent(
    llama_server_bin: Path, model_id: str, kv_cache: str, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    # as lalo runs `kv_cache: q8_0 | q4_0` (bench/calibrate_estimate.py --kv-cache runs every
    # type at more contexts: docs/memory-estimate.md)
    path = request.getfixturevalue("smollm2" if model_id.startswith("smollm2") else "gemma3")
    check_estimate(llama_server_bin, path, 2048, tmp_path, n_vocab=read_gguf(path).vocab_size,
                   kv_cache=kv_cache, within=0.05)


def check_estimate(llama_server_bin: Path, model_file: Path, ctx_size: int, tmp_path: Path,
                   n_vocab: int, kv_cache: str = "f16", within: float = 0.10) -> None:
    estimate = estimate_memory(ModelFacts.from_gguf(read_gguf(model_file)), ctx_size, 1, kv_cache)

    async def measure() -> tuple[int, dict[str, int]]:
        async with httpx.AsyncClient() as client:
            model = ManagedModel(
                "m", LlamaServerEngine(llama_server_bin),
                ServerSettings(model_path=model_file, host="127.0.0.1", port=0, api_key="",
                               ctx_size=ctx_size, parallel=1, threads=None, kv_cache=kv_cache,
                               # verbosity 4 logs the buffers llama.cpp allocated
                               extra_args=("--log-verbosity", "4")),
                ModelLog(tmp_path / "m.log"),
            )
            try:
                endpoint = await model.ensure_ready()
                headers = {"Authorization": f"Bearer {endpoint.api_key}"}
                n_ctx = (await client.get(endpoint.base_url + "/props", headers=headers)).json()[
                    "default_generation_settings"]["n_ctx"]
                rng = random.Random(0)
                prompt = [rng.randrange(300, n_vocab) for _ in range(n_ctx - 24)]
                reply = await client.post(endpoint.base_url + "/completion", headers=headers,
                                          timeout=600, json={"prompt": prompt, "n_predict": 8})
                assert reply.status_code == 200, reply.text
                rss = platform.rss_of(endpoint.pid)
                assert rss is not None
                return rss, dict(model.log.buffers)
            finally:
                await model.close()

    rss, buffers = asyncio.run(measure())
    error = (estimate.total - rss) / rss
    assert abs(error) < within, f"estimate {estimate.as_dict()} vs RSS {rss} ({error:+.1%}), {buffers}"
    # the parts llama-server reports itself match the header arithmetic (a sliding-window model
    # has two KV buffers, and lalo's log parser keeps the last: see test_estimate_swa.py)
    if not estimate.checkpoints:
        assert abs(buffers["CPU KV"] - estimate.kv_cache) <= 1024**2
    assert abs(buffers.get("CPU_REPACK model", 0) - estimate.repacked) <= 1024**2
