"""The report.json schema (``report.schema.json``, JSON Schema 2020-12) and a small validator for it.

The validator implements the keywords the schema uses (type, properties, required, additionalProperties, items,
enum, const, minimum, exclusiveMinimum, minLength, oneOf, local ``$ref``), so kanc needs no jsonschema package;
an unknown keyword is an error rather than silently ignored.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description"}


@cache
def report_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate(document: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Every violation of ``schema`` (default: the report schema) in ``document``, as "path: problem" lines."""
    root = schema if schema is not None else report_schema()
    errors: list[str] = []
    _check(document, root, root, "$", errors)
    return errors


def _check(value: Any, schema: dict[str, Any], root: dict[str, Any], path: str, errors: list[str]) -> None:
    if "$ref" in schema:
        _check(value, _resolve(root, schema["$ref"]), root, path, errors)
        return
    for keyword, arg in schema.items():
        if keyword in _ANNOTATIONS:
            continue
        check = _KEYWORDS.get(keyword)
        if check is None:
            raise ValueError(f"schema keyword {keyword!r} at {path} is not supported by kanc's validator")
        check(value, arg, schema, root, path, errors)


def _resolve(root: dict[str, Any], ref: str) -> dict[str, Any]:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref are supported, got {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _type(value, arg, schema, root, path, errors) -> None:
    names = arg if isinstance(arg, list) else [arg]
    if not any(_TYPES[name](value) for name in names):
        errors.append(f"{path}: expected {' or '.join(names)}, got {type(value).__name__}")


def _properties(value, arg, schema, root, path, errors) -> None:
    if isinstance(value, dict):
        for key, sub in arg.items():
            if key in value:
                _check(value[key], sub, root, f"{path}.{key}", errors)


def _required(value, arg, schema, root, path, errors) -> None:
    if isinstance(value, dict):
        errors.extend(f"{path}: missing {key!r}" for key in arg if key not in value)


def _additional(value, arg, schema, root, path, errors) -> None:
    if not isinstance(value, dict):
        return
    extra = [k for k in value if k not in schema.get("properties", {})]
    if arg is False:
        errors.extend(f"{path}: unexpected {key!r}" for key in extra)
    elif isinstance(arg, dict):
        for key in extra:
            _check(value[key], arg, root, f"{path}.{key}", errors)


def _items(value, arg, schema, root, path, errors) -> None:
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check(item, arg, root, f"{path}[{i}]", errors)


def _enum(value, arg, schema, root, path, errors) -> None:
    if not any(v == value and type(v) is type(value) for v in arg):  # True is not 1 in JSON
        errors.append(f"{path}: {value!r} is not one of {arg}")


def _const(value, arg, schema, root, path, errors) -> None:
    if value != arg or type(value) is not type(arg):
        errors.append(f"{path}: expected {arg!r}, got {value!r}")


def _minimum(value, arg, schema, root, path, errors) -> None:
    if _TYPES["number"](value) and value < arg:
        errors.append(f"{path}: {value} < minimum {arg}")


def _exclusive_minimum(value, arg, schema, root, path, errors) -> None:
    if _TYPES["number"](value) and value <= arg:
        errors.append(f"{path}: {value} <= exclusive minimum {arg}")


def _min_length(value, arg, schema, root, path, errors) -> None:
    if isinstance(value, str) and len(value) < arg:
        errors.append(f"{path}: shorter than {arg} characters")


def _one_of(value, arg, schema, root, path, errors) -> None:
    matches = 0
    for sub in arg:
        sub_errors: list[str] = []
        _check(value, sub, root, path, sub_errors)
        matches += not sub_errors
    if matches != 1:
        errors.append(f"{path}: matches {matches} of the oneOf alternatives, expected exactly 1")


_KEYWORDS = {
    "type": _type,
    "properties": _properties,
    "required": _required,
    "additionalProperties": _additional,
    "items": _items,
    "enum": _enum,
    "const": _const,
    "minimum": _minimum,
    "exclusiveMinimum": _exclusive_minimum,
    "minLength": _min_length,
    "oneOf": _one_of,
}
