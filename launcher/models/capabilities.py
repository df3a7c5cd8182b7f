"""What a configured model can serve, from its GGUF (architecture, chat template) and
its lalo settings: shown in `/v1/models`, Ollama's `/api/tags` and `/api/show`, and checked
before a request is forwarded, so that one the model cannot serve gets a 400 naming the lalo
setting instead of llama-server's advice about its own flags. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.models.gguf_file import GGUFInfo

# Encoder-only architectures llama.cpp runs for embeddings and ranking: they cannot generate.
ENCODERS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3",
                      "neo-bert", "modern-bert", "t5encoder", "gemma-embedding"})
# llama-server ranks with any model given one of these (it sets the ranking pooling); only a
# GGUF trained with a ranking head gives scores that mean something
RERANK_FLAGS = ("--rerank", "--reranking")
EMBEDDING_FLAGS = ("--embedding", "--embeddings")  # what `embeddings: true` passes, in args

# what each model route asks of a model (launcher.proxy.routes labels)
ROUTE_NEEDS = {
    "chat": "chat", "messages": "chat", "count_tokens": "chat", "responses": "chat",
    "input_tokens": "chat", "apply_template": "chat",
    "completions": "completion", "completion": "completion", "infill": "completion",
    "embeddings": "embeddings", "embedding": "embeddings",
    "rerank": "rerank",
    "transcriptions": "audio",
}


@dataclass(frozen=True)
class Capabilities:
    completion: bool  # generates text from a prompt
    chat: bool  # ... from messages, with a chat template
    tools: bool  # its chat template takes tool definitions
    embeddings: bool  # served at /v1/embeddings (`embeddings: true`)
    rerank: bool  # served at /v1/rerank (`--rerank` in args)
    vision: bool = False  # lalo runs no multimodal projector (`--mmproj` is refused): never yet
    audio: bool = False
    architecture: str = ""

    def names(self) -> list[str]:
        """The OpenAI-side list, e.g. ["chat", "completion", "tools"]."""
        return [name for name in ("chat", "completion", "tools", "embeddings", "rerank", "vision",
                                  "audio") if getattr(self, name)]

    def ollama_names(self) -> list[str]:
        """Ollama's names (`/api/show` capabilities): completion, tools, embedding, vision."""
        names = ["completion"] if self.completion else []
        names += ["tools"] if self.tools else []
        names += ["embedding"] if self.embeddings else []
        names += ["vision"] if self.vision else []
        return names

    def refusal(self, route: str, model: str) -> str | None:
        """Why `model` cannot serve a request on `route` (a routes label), naming what to set;
        None when it can (or the route asks nothing of the model)."""
        need = ROUTE_NEEDS.get(route)
        if need is None or getattr(self, need):
            return None
        if need in ("chat", "completion"):
            return (f"model {model} is an embedding model ({self.architecture}): it cannot "
                    "generate text; send it to /v1/embeddings")
        if need == "embeddings":
            pooling = "" if not self.completion else " (a chat model also needs args: [--pooling, mean])"
            return (f"model {model} does not serve embeddings: set models.{model}.embeddings: true "
                    f"in lalo.yaml{pooling}")
        if need == "rerank":
            return (f"model {model} does not rerank: set models.{model}.args: [--rerank] in "
                    "lalo.yaml (on a reranking model: a GGUF with a ranking head)")
        return f"model {model} has no audio input (lalo does not run multimodal projectors yet)"


def capabilities_of(info: GGUFInfo | None, *, embeddings: bool, args: tuple[str, ...] = (),
                    chat_template: str | None = None) -> Capabilities:
    """From the model's GGUF header (None: not on disk yet, assumed a chat model) and settings;
    `chat_template`: the text of the template lalo.yaml gives instead of the file's, if any."""
    # the flags in `args` serve the route as the setting does
    embeddings = embeddings or any(flag in args for flag in EMBEDDING_FLAGS)
    rerank = any(flag in args for flag in RERANK_FLAGS)
    if info is None:
        return Capabilities(completion=True, chat=True, tools=False, embeddings=embeddings,
                            rerank=rerank)
    generates = info.architecture not in ENCODERS
    template = chat_template if chat_template is not None else str(
        info.metadata.get("tokenizer.chat_template", "") or "")
    return Capabilities(
        completion=generates,
        # llama-server falls back to a generic template when the file has none
        chat=generates,
        tools=generates and "tools" in template,
        embeddings=embeddings,
        rerank=rerank,
        architecture=info.architecture,
    )
