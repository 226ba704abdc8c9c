"""Closed schemas (docs/structured-output.md): a forced tool's arguments and a strict
``response_format`` hold exactly the declared properties (an unstated ``additionalProperties``
is false, as OpenAI's strict mode and vLLM's xgrammar take it); a non-strict schema keeps JSON
Schema's meaning unless the server says ``--structured-strict-default``. Grammars are checked on a
byte-level tokenizer, whatever the request path that made them."""

import pytest
from byte_grammar import accepts

from stepserve.server.config import ServerConfig
from stepserve.server.context import ServingContext
from stepserve.server.plan import plan_chat
from stepserve.server.schemas import ChatCompletionRequest, validate
from stepserve.structured.compiler import GrammarCompiler, grammar_text
from stepserve.structured.json_schema import prepare_schema

PERSON = {
    "title": "Person",
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
EXACT = '{"name":"a","age":1}'
EXTRA = '{"name":"a","age":1,"description":"x"}'


def test_closed_objects_hold_exactly_their_properties():
    open_grammar, closed_grammar = grammar_text("json", PERSON), grammar_text("json", PERSON, closed=True)
    assert accepts(open_grammar, EXACT) and accepts(open_grammar, EXTRA)
    assert accepts(closed_grammar, EXACT) and not accepts(closed_grammar, EXTRA)


def test_closing_reaches_nested_objects_defs_and_alternatives_but_not_values():
    schema = {
        "type": "object",
        "properties": {
            "owner": {"$ref": "#/$defs/Person"},
            "pet": {"anyOf": [{"type": "object", "properties": {"kind": {"const": "cat"}}}, {"type": "null"}]},
            "tags": {"type": "array", "items": {"type": "object", "properties": {"t": {"type": "string"}}}},
            "free": {"type": "object", "additionalProperties": True},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
        "$defs": {"Person": PERSON},
        "default": {"properties": {}},
    }
    out = prepare_schema(schema, closed=True)
    assert out["additionalProperties"] is False
    assert out["$defs"]["Person"]["additionalProperties"] is False
    assert out["properties"]["pet"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["pet"]["anyOf"][1]
    assert out["properties"]["tags"]["items"]["additionalProperties"] is False
    assert out["properties"]["free"]["additionalProperties"] is True
    assert out["properties"]["counts"]["additionalProperties"] == {"type": "integer"}
    assert out["default"] == {"properties": {}}  # a value, not a schema
    assert "additionalProperties" not in schema and "additionalProperties" not in PERSON  # the request is not changed
    grammar = grammar_text("json", schema, closed=True)
    assert accepts(grammar, '{"owner":{"name":"a","age":1},"free":{"z":1},"counts":{"q":2}}')
    assert not accepts(grammar, '{"owner":{"name":"a","age":1,"x":1}}')
    assert not accepts(grammar, '{"tags":[{"t":"a","u":"b"}]}')
    assert not accepts(grammar, '{"other":1}')


def test_properties_that_add_up_over_allof_stay_reachable():
    schema = {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}},
            {"type": "object", "properties": {"b": {"type": "integer"}}},
        ]
    }
    grammar = grammar_text("json", schema, closed=True)
    assert accepts(grammar, '{"a":1,"b":2}')
    single = {"allOf": [{"$ref": "#/$defs/P"}], "$defs": {"P": PERSON}}  # pydantic's wrapper of one $ref
    assert not accepts(grammar_text("json", single, closed=True), EXTRA)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny_models import save_byte_tokenizer
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tok")
    save_byte_tokenizer(directory)
    return AutoTokenizer.from_pretrained(str(directory))


def _grammar(tokenizer, server=None, **body) -> str:
    ctx = ServingContext(
        None, tokenizer, "m", 200, 320, ServerConfig(**(server or {})), grammars=GrammarCompiler(tokenizer, 320, {256})
    )
    req = validate(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]} | body)
    return plan_chat(ctx, req).inputs[0].params.structured.grammar


def _format(strict):
    fmt = {"name": "p", "schema": PERSON} | ({} if strict is None else {"strict": strict})
    return {"type": "json_schema", "json_schema": fmt}


TOOL = [{"type": "function", "function": {"name": "Person", "parameters": PERSON}}]


@pytest.mark.parametrize(
    ("body", "server", "closed"),
    [
        ({"response_format": _format(True)}, None, True),
        ({"response_format": _format(False)}, None, False),
        ({"response_format": _format(None)}, None, False),
        ({"response_format": _format(None)}, {"structured_strict_default": True}, True),
        ({"structured_outputs": {"json": PERSON}}, None, False),
        ({"guided_json": PERSON}, {"structured_strict_default": True}, True),
        ({"tools": TOOL, "tool_choice": {"type": "function", "function": {"name": "Person"}}}, None, True),
    ],
)
def test_which_requests_close_their_schema(tokenizer, body, server, closed):
    grammar = _grammar(tokenizer, server, **body)
    assert accepts(grammar, EXACT)
    assert accepts(grammar, EXTRA) is not closed


def test_required_tool_calls_are_closed(tokenizer):
    grammar = _grammar(tokenizer, tools=TOOL, tool_choice="required")
    assert accepts(grammar, f'[{{"name": "Person", "arguments": {EXACT}}}]')
    assert not accepts(grammar, f'[{{"name": "Person", "arguments": {EXTRA}}}]')


def test_free_parts_are_bounded():
    """No whitespace between tokens (a model cannot pad forever) and ``maxLength`` holds."""
    grammar = grammar_text("json", {"type": "object", "properties": {"s": {"type": "string", "maxLength": 3}}}, True)
    assert accepts(grammar, '{"s":"abc"}')
    assert not accepts(grammar, '{"s":"abcd"}')
    assert not accepts(grammar, '{ "s":"a"}') and not accepts(grammar, '{"s": "a"}')
