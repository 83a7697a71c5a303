"""Validation of OpenAI tool definitions (plain Python).

A request's ``tools`` are checked before a template sees them or a parser uses their names:
``{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}``,
names unique and OpenAI-shaped, ``parameters`` a structurally valid JSON Schema object.
Errors name the exact field, e.g. ``tools[1].function.parameters.properties.city.type``.
"""

from __future__ import annotations

import re
from typing import Any

from services.tokenizer.errors import InvalidRequest

# OpenAI allows a-z, A-Z, 0-9, '_' and '-' (max 64); '.' and ':' appear in MCP-style names.
NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
MAX_SCHEMA_DEPTH = 32
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("not", "if", "then", "else", "contains", "propertyNames")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_schema(schema: Any, where: str, depth: int = 0) -> None:
    if isinstance(schema, bool):  # true / false are valid schemas
        return
    if not isinstance(schema, dict):
        raise InvalidRequest(where, f"{where} must be a JSON Schema object, got {_kind(schema)}")
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidRequest(where, f"{where} is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        bad = [k for k in kinds if not isinstance(k, str) or k not in JSON_TYPES]
        if bad or not kinds:
            raise InvalidRequest(f"{where}.type", f"{where}.type must be one of "
                                 f"{', '.join(sorted(JSON_TYPES))} (or a list of them), "
                                 f"got {kind!r}")
    for key in _SCHEMA_MAPS:
        if key in schema:
            sub = schema[key]
            if not isinstance(sub, dict):
                raise InvalidRequest(f"{where}.{key}",
                                     f"{where}.{key} must be an object, got {_kind(sub)}")
            for name, value in sub.items():
                _check_schema(value, f"{where}.{key}.{name}", depth + 1)
    for key in _SCHEMA_LISTS:
        if key in schema:
            sub = schema[key]
            if not isinstance(sub, list) or not sub:
                raise InvalidRequest(f"{where}.{key}",
                                     f"{where}.{key} must be a non-empty list of schemas")
            for n, value in enumerate(sub):
                _check_schema(value, f"{where}.{key}[{n}]", depth + 1)
    for key in (*_SCHEMA_ONE, "items", "additionalProperties", "additionalItems"):
        if key in schema:
            sub = schema[key]
            if key == "items" and isinstance(sub, list):  # draft-07 tuple form
                for n, value in enumerate(sub):
                    _check_schema(value, f"{where}.items[{n}]", depth + 1)
            else:
                _check_schema(sub, f"{where}.{key}", depth + 1)
    required = schema.get("required")
    if required is not None and (not isinstance(required, list)
                                 or not all(isinstance(r, str) for r in required)):
        raise InvalidRequest(f"{where}.required",
                             f"{where}.required must be a list of property names")
    enum = schema.get("enum")
    if enum is not None and not isinstance(enum, list):
        raise InvalidRequest(f"{where}.enum", f"{where}.enum must be a list")


def validate_tools(tools: list[Any] | None, field: str = "tools") -> list[str]:
    """Checks OpenAI tool definitions; returns the function names, in order."""
    names: list[str] = []
    for n, tool in enumerate(tools or []):
        where = f"{field}[{n}]"
        if not isinstance(tool, dict):
            raise InvalidRequest(where, f"{where} must be an object, got {_kind(tool)}")
        kind = tool.get("type", "function")
        if kind != "function":
            raise InvalidRequest(f"{where}.type",
                                 f"{where}.type must be 'function', got {kind!r}")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequest(f"{where}.function",
                                 f"{where}.function must be an object, got {_kind(fn)}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"{where}.function.name", f"{where}.function.name is required")
        if not NAME_RE.fullmatch(name):
            raise InvalidRequest(f"{where}.function.name",
                                 f"{where}.function.name {name!r} must be 1 to 64 characters "
                                 "of a-z, A-Z, 0-9, '_', '-', '.' or ':'")
        if name in names:
            raise InvalidRequest(f"{where}.function.name",
                                 f"{where}.function.name {name!r} is already the name of "
                                 f"{field}[{names.index(name)}]")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequest(f"{where}.function.description",
                                 f"{where}.function.description must be a string")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidRequest(f"{where}.function.strict",
                                 f"{where}.function.strict must be a boolean")
        params = fn.get("parameters")
        if params is not None:
            pwhere = f"{where}.function.parameters"
            if not isinstance(params, dict):
                raise InvalidRequest(pwhere, f"{pwhere} must be a JSON Schema object, got "
                                     f"{_kind(params)}")
            if params.get("type", "object") != "object":
                raise InvalidRequest(f"{pwhere}.type",
                                     f"{pwhere}.type must be 'object', got {params['type']!r}")
            _check_schema(params, pwhere)
        names.append(name)
    return names
