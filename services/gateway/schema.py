"""A structural check of JSON Schemas (response_format, tool parameters) before dispatch.

Not a full meta-schema validator: it catches what makes a grammar compiler fail (wrong types
of keywords, unknown ``type`` names, broken ``$ref``s, invalid ``pattern`` regexes) and names
the offending path, so the client gets a 400 instead of a worker error.
"""

from __future__ import annotations

import re
from typing import Any

from services.gateway.errors import invalid

TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
            "propertyNames", "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
           "minContains", "maxContains")
_NUMBERS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def check_json_schema(schema: Any, param: str) -> None:
    """Raises a 400 naming ``param`` (and the path inside the schema) when it is malformed."""
    _check(schema, param, schema, depth=0)


def _fail(param: str, message: str) -> None:
    raise invalid(param, f"Invalid schema for '{param}': {message}.")


def _check(node: Any, path: str, root: Any, depth: int) -> None:
    if depth > 64:
        _fail(path, "nested too deeply")
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        _fail(path, f"expected an object (or a boolean), got {type(node).__name__}")
    kind = node.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or any(not isinstance(k, str) or k not in TYPES for k in kinds):
            _fail(f"{path}.type", f"unknown type {kind!r}; expected one of {sorted(TYPES)}")
    for key in _SCHEMA_MAPS:
        if key in node:
            value = node[key]
            if not isinstance(value, dict):
                _fail(f"{path}.{key}", "expected an object of schemas")
            for name, sub in value.items():
                _check(sub, f"{path}.{key}.{name}", root, depth + 1)
    for key in _SCHEMA_LISTS:
        if key in node:
            value = node[key]
            if not isinstance(value, list) or (key != "prefixItems" and not value):
                _fail(f"{path}.{key}", "expected a non-empty list of schemas")
            for i, sub in enumerate(value):
                _check(sub, f"{path}.{key}[{i}]", root, depth + 1)
    for key in _SCHEMAS:
        if key in node:
            _check(node[key], f"{path}.{key}", root, depth + 1)
    if "required" in node and (not isinstance(node["required"], list) or not all(
            isinstance(r, str) for r in node["required"])):
        _fail(f"{path}.required", "expected a list of property names")
    if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
        _fail(f"{path}.enum", "expected a non-empty list")
    for key in _COUNTS:
        if key in node and (not isinstance(node[key], int) or isinstance(node[key], bool)
                            or node[key] < 0):
            _fail(f"{path}.{key}", "expected a non-negative integer")
    for key in _NUMBERS:
        if key in node and (not isinstance(node[key], int | float) or isinstance(node[key], bool)):
            _fail(f"{path}.{key}", "expected a number")
    if "pattern" in node:
        pattern = node["pattern"]
        if not isinstance(pattern, str):
            _fail(f"{path}.pattern", "expected a regular expression string")
        try:
            re.compile(pattern)
        except re.error as exc:
            _fail(f"{path}.pattern", f"not a valid regular expression ({exc})")
    if "$ref" in node:
        ref = node["$ref"]
        if not isinstance(ref, str):
            _fail(f"{path}.$ref", "expected a string")
        if ref.startswith("#"):
            target: Any = root
            for part in [p for p in ref[1:].split("/") if p]:
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    _fail(f"{path}.$ref", f"{ref!r} points nowhere in the schema")
                target = target[part]
