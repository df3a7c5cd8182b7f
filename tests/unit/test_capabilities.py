"""What a model can serve (launcher/models/capabilities.py), and the 400 that names the setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.models.capabilities import capabilities_of
from launcher.models.gguf_file import GGUFInfo

TOOLS_TEMPLATE = ("{% if tools %}{{ tools | tojson }}{% endif %}"
                  "{% for m in messages %}{{ m.content }}{% endfor %}")


def info(arch: str, **metadata: Any) -> GGUFInfo:
    return GGUFInfo(path=Path("m.gguf"), file_size=0, version=3,
                    metadata={"general.architecture": arch, **metadata}, array_lengths={}, tensors=())


def test_a_chat_model_with_tools_in_its_template() -> None:
    found = capabilities_of(info("qwen2", **{"tokenizer.chat_template": TOOLS_TEMPLATE}), embeddings=False)
    assert found.names() == ["chat", "completion", "tools"]
    assert found.ollama_names() == ["completion", "tools"]
    assert found.refusal("chat", "qwen") is None
    assert found.refusal("tokenize", "qwen") is None  # asks nothing of the model


def test_embeddings_need_the_lalo_setting_not_a_server_flag() -> None:
    chat = capabilities_of(info("llama", **{"tokenizer.chat_template": "{{ messages }}"}), embeddings=False)
    assert chat.names() == ["chat", "completion"]
    message = chat.refusal("embeddings", "smol")
    assert message == ("model smol does not serve embeddings: set models.smol.embeddings: true in "
                       "lalo.yaml (a chat model also needs args: [--pooling, mean])")
    on = capabilities_of(info("llama"), embeddings=True)
    assert on.refusal("embeddings", "smol") is None and "embeddings" in on.names()


def test_an_encoder_cannot_generate_and_a_reranker_needs_its_flag() -> None:
    bert = capabilities_of(info("bert", **{"bert.pooling_type": 4}), embeddings=True)
    assert bert.names() == ["embeddings"]
    assert "is an embedding model (bert): it cannot generate" in str(bert.refusal("chat", "e5"))
    assert "--rerank" in str(bert.refusal("rerank", "e5"))
    ranker = capabilities_of(info("bert", **{"bert.pooling_type": 4}), embeddings=False, args=("--rerank",))
    assert ranker.refusal("rerank", "e5") is None
    # llama-server ranks with any model given the flag (the scores mean something only with a
    # ranking head), and a flag in args serves embeddings as the setting does
    assert capabilities_of(info("llama"), embeddings=False, args=("--reranking",)).rerank
    assert capabilities_of(info("llama"), embeddings=False, args=("--embeddings",)).embeddings


def test_the_configured_template_decides_tools_and_no_file_means_a_chat_model() -> None:
    plain = capabilities_of(info("llama", **{"tokenizer.chat_template": TOOLS_TEMPLATE}),
                            embeddings=False, chat_template="{{ messages }}")
    assert not plain.tools
    assert capabilities_of(None, embeddings=False).names() == ["chat", "completion"]
    assert "no audio input" in str(capabilities_of(None, embeddings=False).refusal("transcriptions", "m"))
