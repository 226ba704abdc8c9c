"""Request fields that constrain the output (OpenAI's ``response_format``, vLLM's
``structured_outputs`` and ``guided_*``) become one checked ``GrammarSpec``, or a 400."""

from __future__ import annotations

from stepserve.errors import InvalidRequestError
from stepserve.server.context import ServingContext
from stepserve.server.schemas import _StructuredFields
from stepserve.sampling import GrammarSpec


def requested_constraints(req: _StructuredFields) -> list[tuple[str, str, object]]:
    """(field as the client spelled it, kind, source) of every constraint the request sets."""
    found = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", "json_object", None))
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise InvalidRequestError(
                "response_format.json_schema.schema is required with type=json_schema", "response_format"
            )
        found.append(("response_format", "json", fmt.json_schema.schema_))
    so = req.structured_outputs
    if so is not None:
        for name, kind, value in (
            ("json", "json", so.json_),
            ("regex", "regex", so.regex),
            ("choice", "choice", so.choice),
            ("grammar", "grammar", so.grammar),
        ):
            if value is not None:
                found.append((f"structured_outputs.{name}", kind, value))
        if so.json_object:
            found.append(("structured_outputs.json_object", "json_object", None))
    for name, kind in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = getattr(req, name)
        if value is not None:
            found.append((name, kind, value))
    return found


def _checked_source(param: str, kind: str, source: object) -> object:
    if kind == "choice" and (not source or not all(source)):
        raise InvalidRequestError(f"{param} must be a non-empty list of non-empty strings", param)
    if kind == "json" and isinstance(source, str):
        import json

        try:
            source = json.loads(source)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param) from None
    if kind == "json" and not isinstance(source, dict):
        raise InvalidRequestError(f"{param} must be a JSON schema object", param)
    return source


def output_constraint(ctx: ServingContext, req: _StructuredFields) -> tuple[str, GrammarSpec] | None:
    """(field, compiled spec) of the request's constraint; None for free text; 400 on conflict or error."""
    found = requested_constraints(req)
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _, _ in found)
        raise InvalidRequestError(f"only one output constraint may be given, got {names}", found[1][0])
    param, kind, source = found[0]
    return param, compile_constraint(ctx, param, kind, _checked_source(param, kind, source))


def compile_constraint(ctx: ServingContext, param: str, kind: str, source: object) -> GrammarSpec:
    if ctx.grammars is None:
        raise InvalidRequestError(f"{param}: structured output is not available on this server", param)
    return ctx.grammars.compile(kind, source, param)
