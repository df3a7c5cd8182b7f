"""One entry of lalo.yaml's `models`: a model server's file, engine and settings, validated."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from launcher.config.fields import (
    NAME,
    TEMPLATE_NAME,
    EngineKind,
    KvCacheType,
    Section,
    is_template_file,
)
from launcher.config.request_params import (
    Limits,
    ParamName,
    RequestParams,
    RequestRules,
    request_rules,
)
from launcher.config.server_args import offload_flag


class ModelConfig(Section):
    file: str | None = None
    catalog: str | None = None
    engine: EngineKind | None = None
    ctx_size: Annotated[int, Field(ge=128, le=4_194_304)] = 2048
    # `ctx_size: auto` in YAML: lalo picks the largest context that fits (placement/context.py),
    # at most `ctx_max`; until then ctx_size holds the fallback for a model with unknown facts
    ctx_auto: bool = False
    ctx_max: Annotated[int, Field(ge=256, le=4_194_304)] | None = None
    threads: int | Literal["auto"] = "auto"
    parallel: Annotated[int, Field(ge=1, le=256)] = 1
    preload: bool = True
    pinned: bool = False  # never evicted to make room for another model
    ttl: Annotated[float, Field(ge=0)] = 0.0
    aliases: Annotated[tuple[str, ...], Field(strict=False)] = ()
    args: Annotated[tuple[str, ...], Field(strict=False)] = ()
    env: Mapping[str, str] = Field(default_factory=dict)
    license: str | None = None
    embeddings: bool = False
    load_timeout: Annotated[float, Field(gt=0)] | None = None
    # a Jinja template file (relative to this config), or the name of one built into llama.cpp
    chat_template: str | None = None
    sleep_after: Annotated[int, Field(ge=0, le=31_536_000)] = 0  # llama-server only; 0 = never
    prompt_cache: bool = True  # llama-server only: save cached prompts on stop, restore on start
    # llama-server on a GPU machine: auto = lalo's GPU plan (-ngl/--tensor-split), fit = leave
    # it to llama-server's --fit, N = that many layers (see docs/gpu.md)
    gpu_layers: int | Literal["auto", "fit"] = "auto"
    # llama-server's -ctk/-ctv for K and V (with -fa on for a quantized one): q8_0 about halves the
    # context's memory, q4_0 about quarters it (docs/memory-estimate.md)
    kv_cache: KvCacheType = "f16"
    # request parameters (launcher.proxy.params): used when a request omits them, always set
    # over the caller's, bounded, removed; precedence set > limits > defaults
    defaults: RequestParams = RequestParams()
    set: RequestParams = RequestParams()
    limits: Limits = Limits()
    strip: Annotated[tuple[ParamName, ...], Field(strict=False)] = ()

    @model_validator(mode="before")
    @classmethod
    def _ctx_auto(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        if "ctx_auto" in data:
            raise ValueError("unknown key ctx_auto: write ctx_size: auto")
        if data.get("ctx_size") == "auto":
            return {**data, "ctx_size": 2048, "ctx_auto": True}
        if isinstance(data.get("ctx_size"), str):
            raise ValueError(f"ctx_size: must be 'auto' or a number of tokens, got {data['ctx_size']!r}")
        if data.get("ctx_max") is not None:
            raise ValueError("ctx_max: caps ctx_size: auto; with a fixed ctx_size, set only that")
        return data

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, value: Any) -> int | str:
        if value == "auto":
            return "auto"
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
            raise ValueError(f"must be 'auto' or an integer from 1 to 1024, got {value!r}")
        return value

    @field_validator("gpu_layers", mode="before")
    @classmethod
    def _gpu_layers(cls, value: Any) -> int | str:
        if value in ("auto", "fit"):
            return str(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10_000:
            raise ValueError(f"must be 'auto', 'fit' or a number of layers from 0 to 10000, "
                             f"got {value!r}")
        return value

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, aliases: tuple[str, ...]) -> tuple[str, ...]:
        for alias in aliases:
            if not NAME.match(alias):
                raise ValueError(f"alias {alias!r} must match {NAME.pattern}")
        return aliases

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str | None) -> str | None:
        if value is not None and not is_template_file(value) and not TEMPLATE_NAME.match(value):
            raise ValueError(f"must be a template file (.jinja) or a llama.cpp template name "
                             f"such as chatml or llama3, got {value!r}")
        return value

    @model_validator(mode="after")
    def _source(self) -> ModelConfig:
        if (self.file is None) == (self.catalog is None):
            raise ValueError("give exactly one of 'file' or 'catalog'")
        if self.chat_template is not None and self.engine_kind != "llama-server":
            raise ValueError(f"chat_template needs the llama-server engine, not {self.engine_kind}")
        if self.sleep_after and self.engine_kind != "llama-server":
            raise ValueError(f"sleep_after needs engine llama-server, not {self.engine_kind}")
        if ("prompt_cache" in self.model_fields_set and self.prompt_cache
                and self.engine_kind != "llama-server"):
            raise ValueError(f"prompt_cache needs engine llama-server, not {self.engine_kind}")
        if self.gpu_layers != "auto" and self.engine_kind != "llama-server":
            raise ValueError(f"gpu_layers needs engine llama-server, not {self.engine_kind}")
        if self.kv_cache != "f16" and self.engine_kind != "llama-server":
            raise ValueError(f"kv_cache {self.kv_cache} needs engine llama-server (lalo passes "
                             f"no KV cache type to {self.engine_kind}): use f16 or that engine")
        self.request_rules  # noqa: B018 - raises for contradicting rules
        flag = offload_flag(self.args)
        if self.gpu_layers != "auto" and flag is not None:
            raise ValueError(f"gpu_layers and args {flag!r} both set the GPU offload; keep one")
        return self

    @property
    def request_rules(self) -> RequestRules:
        """What the proxy does to this model's request parameters (empty: nothing)."""
        return request_rules(self.defaults, self.set, self.limits, self.strip)

    @property
    def chat_template_is_file(self) -> bool:
        return self.chat_template is not None and is_template_file(self.chat_template)

    @property
    def thread_count(self) -> int | None:
        """The threads setting as a number; None for auto (the engine's default)."""
        return None if self.threads == "auto" else self.threads

    @property
    def engine_kind(self) -> EngineKind:
        """The engine to run: as configured, else llamafile for `.llamafile` files."""
        if self.engine is not None:
            return self.engine
        if self.file is not None and self.file.endswith(".llamafile"):
            return "llamafile"
        return "llama-server"


