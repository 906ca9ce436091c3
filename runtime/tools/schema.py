"""JSON schemas of tool arguments, in the self-contained form prompts and grammars need.

Pydantic writes a model's schema with `title`s everywhere and nested models as `$ref`s into a
top-level `$defs` table. A tool's `parameters` schema is embedded inside other schemas (the action
schema puts each tool's under `calls[i].arguments`), where those root-relative references would dangle,
and the titles only cost prompt tokens. `parameters_schema` therefore inlines every local `$ref` and
drops the titles; data-valued keywords (`default`, `enum`, `const`, `examples`) are copied untouched.
`bound_schema` caps string lengths and collection sizes, so constrained output always ends.

It deliberately does not: support recursive argument types (they cannot be inlined; ValueError at
registration), resolve remote `$ref`s, or validate arguments (pydantic does that in the registry).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

_LOCAL_REF = "#/$defs/"
_DATA_KEYWORDS = frozenset({"default", "enum", "const", "examples"})  # values are JSON data, not schemas
_NAMED_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "dependentSchemas"})  # name -> schema


def parameters_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of a pydantic arguments model: `$ref`s inlined, titles dropped."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"model must be a pydantic BaseModel subclass, got {model!r}")
    return inline_schema(model.model_json_schema())


def inline_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` with local `#/$defs/...` references replaced by their targets and titles removed.

    Raises ValueError for a recursive definition, a non-local `$ref` or a reference to a missing definition.
    """
    if not isinstance(schema, dict):
        raise TypeError(f"schema must be a dict, got {type(schema).__name__}")
    definitions = schema.get("$defs", {})

    def resolve(node: Any, expanding: frozenset[str]) -> Any:
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        if "$ref" in node:
            ref = node["$ref"]
            if not isinstance(ref, str) or not ref.startswith(_LOCAL_REF):
                raise ValueError(f"schema: only local {_LOCAL_REF}... references are supported, got {ref!r}")
            name = ref[len(_LOCAL_REF):]
            if name in expanding:
                raise ValueError(f"schema: recursive type {name!r} cannot be used in tool arguments")
            if name not in definitions:
                raise ValueError(f"schema: reference {ref!r} has no definition")
            out.update(resolve(definitions[name], expanding | {name}))
        rest = {key: value for key, value in node.items() if key not in ("$ref", "$defs", "title")}
        out.update(_map_subschemas(rest, lambda sub: resolve(sub, expanding)))
        return out

    return resolve(schema, frozenset())


def bound_schema(schema: dict[str, Any], *, max_string_chars: int | None = None,
                 max_items: int | None = None) -> dict[str, Any]:
    """A copy of `schema` where every string, array and open object has a size bound.

    Strings get `maxLength` <= max_string_chars; arrays `maxItems` <= max_items; objects that allow extra
    properties get `maxProperties` <= max_items and keys of at most max_string_chars. Existing tighter bounds
    stay; a bound never goes below the schema's minimum. Under a grammar this makes every output of a
    weak (or random) model close within a predictable number of tokens.
    """
    for name, bound in (("max_string_chars", max_string_chars), ("max_items", max_items)):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 1):
            raise ValueError(f"{name} must be a positive int or None, got {bound!r}")

    def tighten(node: dict[str, Any], key: str, floor: int, bound: int | None) -> None:
        if bound is not None:
            node[key] = max(min(node.get(key, bound), bound), floor)

    def visit(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out = _map_subschemas(node, visit)
        types = out.get("type")
        types = set(types) if isinstance(types, list) else {types}
        if "string" in types:
            tighten(out, "maxLength", out.get("minLength", 0), max_string_chars)
        if "array" in types:
            tighten(out, "maxItems", out.get("minItems", 0), max_items)
        extra = out.get("additionalProperties", None if "properties" in out else True)  # as xgrammar reads it
        if "object" in types and extra not in (None, False):
            tighten(out, "maxProperties", max(out.get("minProperties", 0), len(out.get("required", []))), max_items)
            if max_string_chars is not None and "propertyNames" not in out:
                out["propertyNames"] = {"maxLength": max_string_chars}
        return out

    return visit(schema)


def _map_subschemas(node: dict[str, Any], transform: Any) -> dict[str, Any]:
    """`node` with `transform` applied to each direct subschema; keyword names and data values kept."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DATA_KEYWORDS:
            out[key] = value
        elif key in _NAMED_SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: transform(sub) for name, sub in value.items()}
        elif isinstance(value, dict):
            out[key] = transform(value)
        elif isinstance(value, list):
            out[key] = [transform(item) if isinstance(item, dict) else item for item in value]
        else:
            out[key] = value
    return out
