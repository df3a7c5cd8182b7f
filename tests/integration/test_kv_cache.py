"""`kv_cache: q8_0` end to end: lalo starts the real llama-server with K and V in q8_0 (and flash
attention), the server's own log says so, its KV buffer is the size lalo planned, and it answers."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from launcher.models.gguf_file import read_gguf
from launcher.models.shape import ModelFacts
from launcher.placement.estimate import MemorySettings, estimate_for
from tests.support.lalo import LaloUp, lalo_env, write_config

pytestmark = pytest.mark.integration
MIB = 1024**2
# llama_kv_cache: size =   23.91 MiB (  2048 cells,  30 layers,  1/1 seqs), K (q8_0): ..., V (q8_0): ...
KV_LINE = re.compile(r"llama_kv_cache: size =\s+([\d.]+) MiB .* K \((\w+)\):.* V \((\w+)\):")


def test_smollm2_with_a_q8_0_kv_cache(llama_server_bin: Path, smollm2: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "lalo.yaml",
        # verbosity 4: llama-server logs its KV cache's size and types
        {"smol": {"catalog": "smollm2-135m-instruct", "ctx_size": 2048, "parallel": 1,
                  "kv_cache": "q8_0", "args": ["--log-verbosity", "4"]}},
        engines={"llama_server": {"path": str(llama_server_bin)}},
    )
    state = tmp_path / "state"
    with LaloUp(config, lalo_env(state, tmp_path / "config")) as up:
        model = up.wait_state("smol", "ready")
        # what lalo told the server: K and V in q8_0, flash attention on
        (server,) = [child for child in up.children() if child.pid == model["pid"]]
        argv = server.cmdline()
        at = argv.index("--cache-type-k")
        assert argv[at:at + 6] == ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0",
                                   "--flash-attn", "on"]
        with httpx.Client(base_url=up.url, timeout=300) as client:
            chat = client.post("/v1/chat/completions", json={
                "model": "smol", "temperature": 0, "max_tokens": 24,
                "messages": [{"role": "system", "content": "You are a helpful assistant."},
                             {"role": "user", "content": "What is the capital of France?"}]})
            assert chat.status_code == 200, chat.text
            assert "Paris" in chat.json()["choices"][0]["message"]["content"]
        model = up.model("smol")
        # /api/status: the setting, and the estimate made with it
        planned = estimate_for(ModelFacts.from_gguf(read_gguf(smollm2)), MemorySettings(2048, 1, "q8_0"))
        assert model["kv_cache"] == "q8_0" and model["ctx_size"] == 2048
        assert model["ram_estimate"] == planned.total
        assert model["rss"] and abs(planned.total - model["rss"]) / model["rss"] < 0.25
    # what the server did: its log names the types, and the cache is the size lalo planned
    (line,) = [m for m in KV_LINE.finditer((state / "logs" / "smol.log").read_text())]
    size, k_type, v_type = float(line.group(1)) * MIB, line.group(2), line.group(3)
    assert (k_type, v_type) == ("q8_0", "q8_0")
    assert size == pytest.approx(planned.kv_cache, abs=0.01 * MIB)
    assert planned.kv_cache == 45 * MIB * 17 // 32  # f16's 45 MiB at 34/64 of the width
