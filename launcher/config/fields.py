"""Shared pieces of the lalo.yaml schema: name patterns, literal types and the frozen section base."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
)

CONFIG_NAME = "lalo.yaml"
EngineKind = Literal["llama-server", "llamafile", "llama-cpp-python"]
# The KV cache types lalo offers (K and V alike): each halves the one before it, near enough
KvCacheType = Literal["f16", "q8_0", "q4_0"]
HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
                        r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$")
ORIGIN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]+$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
TEMPLATE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".tmpl", ".txt")


def is_template_file(value: str) -> bool:
    """A chat_template that names a file rather than one of llama.cpp's built-in templates."""
    return "/" in value or "\\" in value or value.endswith(TEMPLATE_SUFFIXES)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


ApiKeyRole = Literal["inference", "admin"]

