"""One catalog entry (`catalog.yaml`'s `models.ID`): a model file on the hub or in wheels on a
package index, its licence and the architecture facts that let lalo estimate memory before
anything is downloaded; validated and frozen (pydantic, strict)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from launcher.errors import UsageError
from launcher.models.facts import catalog_facts
from launcher.models.hub_file import HubFile
from launcher.models.licenses import lookup
from launcher.models.shape import QUANT_BITS, ModelFacts
from launcher.models.wheels import WheelSource

_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# name==version, as pip takes it (PEP 508 name, an exact version: pulls must be reproducible)
_WHEEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?==[A-Za-z0-9][A-Za-z0-9.+!_-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LicenseInfo(_Strict):
    """An SPDX id, or a custom licence's id (as the hub names it) with its name and URL."""

    id: str
    name: str | None = None
    url: str | None = None
    source: str  # where the licence was read (the model card)

    @model_validator(mode="after")
    def _custom_needs_name(self) -> LicenseInfo:
        known = lookup(self.id)
        if (known is None or not known.spdx) and not (self.name and self.url):
            raise ValueError(f"custom licence {self.id!r} needs `name` and `url`")
        return self

    @property
    def display_name(self) -> str:
        known = lookup(self.id)
        return self.name or (known.name if known else self.id)

    @property
    def link(self) -> str | None:
        known = lookup(self.id)
        return self.url or (known.url if known else None)


class Architecture(_Strict):
    """The config.json facts that decide memory and speed."""

    name: str
    parameters: Annotated[int, Field(gt=0)]
    n_layer: Annotated[int, Field(gt=0)]
    n_embd: Annotated[int, Field(gt=0)]
    n_ff: Annotated[int, Field(gt=0)]
    n_head: Annotated[int, Field(gt=0)]
    n_head_kv: Annotated[int, Field(gt=0)]
    head_dim: Annotated[int, Field(gt=0)]
    n_vocab: Annotated[int, Field(gt=0)]
    n_ctx_train: Annotated[int, Field(gt=0)]
    # a BPE tokenizer's merges (tokenizer.json's `merges`; 0: SentencePiece, or not read yet)
    n_merges: Annotated[int, Field(ge=0)] = 0
    # Hybrid models (lfm2): the layers with attention; the others are short convolutions.
    attention_layers: Annotated[tuple[int, ...], Field(strict=False)] | None = None
    conv_l_cache: Annotated[int, Field(gt=0)] | None = None
    # Sliding-window attention (Gemma 2/3...): the window in tokens, and the layers that attend
    # to the whole context (every other layer keeps KV for its window only).
    sliding_window: Annotated[int, Field(gt=0)] | None = None
    global_layers: Annotated[tuple[int, ...], Field(strict=False)] | None = None

    @model_validator(mode="after")
    def _layers(self) -> Architecture:
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv})")
        for layer in self.attention_layers or ():
            if not 0 <= layer < self.n_layer:
                raise ValueError(f"attention_layers: {layer} is not a layer of a {self.n_layer}-layer model")
        if (self.attention_layers is None) != (self.conv_l_cache is None):
            raise ValueError("attention_layers and conv_l_cache go together (hybrid models)")
        if (self.sliding_window is None) != (self.global_layers is None):
            raise ValueError("sliding_window and global_layers go together (sliding-window models)")
        for layer in self.global_layers or ():
            if not 0 <= layer < self.n_layer:
                raise ValueError(f"global_layers: {layer} is not a layer of a {self.n_layer}-layer model")
        return self

    def swa_layers(self) -> tuple[bool, ...]:
        """Per layer, whether it uses the sliding window (empty: no sliding window)."""
        if self.global_layers is None:
            return ()
        full = set(self.global_layers)
        return tuple(i not in full for i in range(self.n_layer))

    def kv_heads(self) -> tuple[int, ...]:
        if self.attention_layers is None:
            return (self.n_head_kv,) * self.n_layer
        with_attention = set(self.attention_layers)
        return tuple(self.n_head_kv if i in with_attention else 0 for i in range(self.n_layer))


class Weights(_Strict):
    """The file's tensor table in brief, once the file has been read: what the estimate takes
    from a GGUF (`lalo inspect FILE --json` prints it as `catalog_weights`)."""

    bytes: Annotated[int, Field(gt=0)]  # tensor data: the file less its header and vocabulary
    # matrix-multiply weights by tensor type (what a CPU may repack into a second copy)
    matmul: Annotated[Mapping[str, Annotated[int, Field(ge=0)]], Field(strict=False)]
    input: Annotated[int, Field(ge=0)]  # the input layer (token embedding...), always in RAM
    output: Annotated[int, Field(ge=0)]  # the output layer (a tied one is the embedding again)
    tied: bool


class CatalogEntry(_Strict):
    """One model file on the hub and what lalo knows of it without downloading it."""

    id: str
    name: str
    # where it comes from: the hub (repo, file, revision) or wheels (wheels, members, sha256;
    # `file` is then the joined file's name)
    repo: str | None = None
    file: str
    revision: str | None = None
    wheels: Annotated[tuple[str, ...], Field(strict=False)] | None = None
    members: Annotated[tuple[str, ...], Field(strict=False)] | None = None
    file_type: str
    size: Annotated[int, Field(gt=0)]
    size_exact: bool = False
    sha256: str | None = None
    license: LicenseInfo
    base_model: str
    purpose: str
    context: Annotated[int, Field(gt=0)]
    default_ctx: Annotated[int, Field(ge=128)]
    bench_shape: str | None = None
    architecture: Architecture
    weights: Weights | None = None  # None: not read yet (the file's size stands in)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError(f"must match {_ID.pattern}")
        return value

    @field_validator("repo", "base_model")
    @classmethod
    def _repo(cls, value: str | None) -> str | None:
        if value is not None and not _REPO.match(value):
            raise ValueError("must be a hub repository id such as Owner/Name")
        return value

    @field_validator("wheels")
    @classmethod
    def _wheels(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("must name at least one wheel")
        for item in value:
            if not _WHEEL.match(item):
                raise ValueError(f"{item!r} is not name==version (an exact version)")
        return value

    @field_validator("members")
    @classmethod
    def _members(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("must name at least one member")
        for item in value:
            if not item or item.startswith("/") or ".." in item.split("/"):
                raise ValueError(f"{item!r} is not a relative path inside a wheel")
        return value

    @field_validator("file")
    @classmethod
    def _file(cls, value: str) -> str:
        if not value.endswith(".gguf") or value.startswith("/") or ".." in value.split("/"):
            raise ValueError("must be a relative .gguf path inside the repository")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.match(value):
            raise ValueError("must be 64 lowercase hex digits")
        return value

    @field_validator("file_type")
    @classmethod
    def _file_type(cls, value: str) -> str:
        if value not in QUANT_BITS:
            raise ValueError(f"must be one of {', '.join(QUANT_BITS)}")
        return value

    @model_validator(mode="after")
    def _ctx(self) -> CatalogEntry:
        if self.default_ctx > self.context:
            raise ValueError(f"default_ctx {self.default_ctx} is above the model's context {self.context}")
        hub = self.repo is not None or self.revision is not None
        wheel = self.wheels is not None or self.members is not None
        if hub == wheel:
            raise ValueError("give either repo + revision (the hub) or wheels + members (a package index)")
        if hub and (self.repo is None or self.revision is None):
            raise ValueError("a hub model needs both `repo` and `revision`")
        if wheel:
            if self.wheels is None or self.members is None:
                raise ValueError("a wheel model needs both `wheels` and `members`")
            if self.sha256 is None:
                raise ValueError("a wheel model needs the `sha256` of the joined file")
            if "/" in self.file:
                raise ValueError("file: a wheel model's `file` is the joined file's name, without folders")
        return self

    @property
    def source_kind(self) -> str:
        """`hub` or `wheels`."""
        return "wheels" if self.wheels is not None else "hub"

    @property
    def source_ref(self) -> str:
        """Where the file comes from, in one line (for messages)."""
        if self.wheels is not None:
            return "wheels " + ", ".join(self.wheels)
        return f"{self.repo}/{self.file}"

    @property
    def pinned(self) -> bool:
        """Whether the source is immutable: a hub commit, or exact wheel versions with a sha256."""
        if self.wheels is not None:
            return True
        return bool(self.revision and _COMMIT.match(self.revision))

    def hub_file(self, revision: str | None = None) -> HubFile:
        if self.repo is None or self.revision is None:
            raise UsageError(f"{self.id} comes from wheels ({', '.join(self.wheels or ())}), not the hub")
        size = self.size if self.size_exact else None
        return HubFile(
            repo=self.repo,
            filename=self.file,
            revision=revision or self.revision,
            sha256=self.sha256 if revision is None else None,
            size=size,
        )

    def wheel_source(self) -> WheelSource:
        if self.wheels is None or self.members is None or self.sha256 is None:
            raise UsageError(f"{self.id} comes from the hub ({self.repo}), not from wheels")
        return WheelSource(
            filename=self.file,
            wheels=self.wheels,
            members=self.members,
            sha256=self.sha256,
            size=self.size if self.size_exact else None,
        )

    def facts(self) -> ModelFacts:
        """Facts for memory estimates before the file exists (launcher.models.facts)."""
        return catalog_facts(self)
