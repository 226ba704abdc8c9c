"""JSON schemas as clients mean them, made ready for llguidance's JSON compiler.

Two rewrites, on a copy (the request's schema is never changed):

- every ``pattern`` (and ``patternProperties`` key) is ECMA-262, as JSON Schema defines it, and
  becomes Rust ``regex`` syntax with the same meaning (``ecma_regex.to_rust``);
- a *closed* schema treats an unstated ``additionalProperties`` as ``false``: what OpenAI's
  strict mode requires and vLLM's default xgrammar backend assumes, and what a client that sends a
  tool or a strict ``response_format`` expects (exactly the properties it declared). Every object
  schema without ``additionalProperties``, ``unevaluatedProperties`` or ``patternProperties``
  gets ``"additionalProperties": false``, except where properties add up from several schemas:
  the members of an ``allOf`` of two or more, and a schema that combines its own properties with
  an ``allOf``, ``anyOf`` or ``oneOf`` (each ``anyOf``/``oneOf`` alternative is closed itself).

Values (``const``, ``enum``, ``default``, ``examples``) are data and are never walked.
"""

from __future__ import annotations

from stepserve.structured.ecma_regex import UnsupportedRegex, to_rust

_SCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")
_SCHEMAS = (
    "additionalProperties",
    "unevaluatedProperties",
    "items",
    "additionalItems",
    "unevaluatedItems",
    "contains",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
)
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_OPEN_KEYS = ("additionalProperties", "unevaluatedProperties", "patternProperties", "allOf", "anyOf", "oneOf")


def prepare_schema(schema: object, closed: bool, rewrite_patterns: bool = True) -> object:
    """A copy of ``schema`` with ECMA patterns rewritten (unless ``rewrite_patterns`` is false:
    then the copy is still JSON Schema, for a validator) and, if ``closed``, unstated
    ``additionalProperties`` set to false; ``ValueError`` naming the pattern's place when one
    cannot be honoured."""
    return _walk(schema, closed, "", True, rewrite_patterns)


def _is_object_schema(schema: dict) -> bool:
    kind = schema.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in schema


def _walk(schema: object, closed: bool, where: str, may_close: bool, rewrite: bool) -> object:
    if not isinstance(schema, dict):
        return schema  # true/false schemas, or malformed ones llguidance will name
    out = dict(schema)
    if rewrite and isinstance(out.get("pattern"), str):
        out["pattern"] = _pattern(out["pattern"], f"{where}/pattern")
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {
                name: _walk(sub, closed, f"{where}/{key}/{name}", True, rewrite) for name, sub in out[key].items()
            }
    if isinstance(out.get("patternProperties"), dict):
        out["patternProperties"] = {
            (_pattern(pat, f"{where}/patternProperties/{pat}") if rewrite else pat): _walk(
                sub, closed, f"{where}/patternProperties/{pat}", True, rewrite
            )
            for pat, sub in out["patternProperties"].items()
        }
    for key in _SCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = _walk(out[key], closed, f"{where}/{key}", True, rewrite)
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            members_close = not (key == "allOf" and len(out[key]) > 1)
            out[key] = [
                _walk(sub, closed, f"{where}/{key}/{i}", members_close, rewrite) for i, sub in enumerate(out[key])
            ]
    if closed and may_close and _is_object_schema(out) and not any(key in out for key in _OPEN_KEYS):
        out["additionalProperties"] = False
    return out


def _pattern(pattern: str, where: str) -> str:
    try:
        return to_rust(pattern)
    except UnsupportedRegex as exc:
        raise ValueError(f"the pattern {pattern!r} at {where or '/'}: {exc}") from None
