"""YAML read with the line of every key kept, and validation errors as one line naming the path.

Shared by lalo.yaml, bundle specs and the model catalog:
`lalo.yaml:7: models.qwen.ctx_size: must be >= 128, got 0`.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from launcher.errors import ConfigError

Lines = Mapping[tuple[str, ...], int]


def read_yaml(text: str, label: str) -> tuple[Any, Lines]:
    """The parsed document and its line index; invalid YAML is a ConfigError with the line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{label}{where}: invalid YAML: {problem}") from None
    return data, _line_index(node)


def _line_index(node: yaml.Node | None) -> dict[tuple[str, ...], int]:
    """YAML path -> 1-based line of its key (for mappings) or item (for lists)."""
    index: dict[tuple[str, ...], int] = {}

    def walk(current: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                child = (*path, str(key.value))
                index[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(current, yaml.SequenceNode):
            for position, item in enumerate(current.value):
                child = (*path, str(position))
                index[child] = item.start_mark.line + 1
                walk(item, child)

    if node is not None:
        walk(node, ())
    return index


def where(label: str, lines: Lines, path: Sequence[str]) -> str:
    """`label:LINE: ` for the nearest known line of `path` (or just `label: `)."""
    key = tuple(path)
    while key:
        if key in lines:
            return f"{label}:{lines[key]}: "
        key = key[:-1]
    return f"{label}: "


_MESSAGES = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "literal_error": "must be one of {expected}",
    "missing": "is required",
    "too_short": "must not be empty",
}


def describe(exc: ValidationError, label: str, lines: Lines, root: type[BaseModel],
             prefix: Sequence[str] = ()) -> str:
    """The first error of `exc`, as `label:line: yaml.path: message, got VALUE`."""
    error = exc.errors(include_url=False)[0]
    loc = [*prefix, *(str(part) for part in error["loc"] if not _is_union_member(part))]
    kind = error["type"]
    got = error.get("input")
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[len(prefix):-1])
        known = ", ".join(parent.model_fields) if parent is not None else ""
        message = "unknown key" + (f" (known keys: {known})" if known else "")
        got = None
    elif kind == "value_error":
        message = str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
        got = None
    elif kind in _MESSAGES:
        message = _MESSAGES[kind].format(**error.get("ctx", {}))
    else:
        message = error["msg"][0].lower() + error["msg"][1:]
    if got is not None and kind != "missing":
        message += f", got {got!r}"
    return f"{where(label, lines, loc)}{'.'.join(loc) or '(top level)'}: {message}"


def _is_union_member(part: Any) -> bool:
    # pydantic adds the failing union member to loc, e.g. ('load_timeout', 'constrained-float')
    text = str(part)
    return text in ("int", "str", "float", "bool") or text.startswith(
        ("literal[", "constrained-", "function-")
    )


def _model_at(root: type[BaseModel], loc: Sequence[str]) -> type[BaseModel] | None:
    """The model class at a YAML path: nested models by field, mappings of models by key."""
    model: type[BaseModel] = root
    position = 0
    while position < len(loc):
        field = model.model_fields.get(loc[position])
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            position += 1
            continue
        values = [arg for arg in typing.get_args(annotation)
                  if isinstance(arg, type) and issubclass(arg, BaseModel)]
        if typing.get_origin(annotation) in (dict, Mapping) and values:
            if position + 1 >= len(loc):
                return None  # the mapping itself: its keys are free-form names
            model = values[0]
            position += 2
            continue
        return None
    return model
