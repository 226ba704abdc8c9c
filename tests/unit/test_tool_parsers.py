"""Tool-call parsing (canned model outputs, whole and streamed in random pieces), the
``required`` stream scanner, and the front end's 400s for constraints and tools."""

import json
import random
import threading

import pytest

from stepserve.errors import InvalidRequestError
from stepserve.server import openai
from stepserve.server.config import ServerConfig
from stepserve.server.context import ServingContext
from stepserve.server.schemas import ChatCompletionRequest, CompletionRequest, validate
from stepserve.structured.compiler import GrammarCompiler
from stepserve.structured.tool_parsers import HermesParser, Llama3JsonParser, StreamPiece
from stepserve.structured.tools import RequiredCallsScanner, ToolCall

HERMES_OUTPUT = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "add", "arguments": {"x": 1, "y": [2, "}"]}}\n</tool_call>'
)
HERMES_CALLS = [ToolCall("get_weather", '{"city": "Paris", "unit": "c"}'), ToolCall("add", '{"x": 1, "y": [2, "}"]}')]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}},
]


def pieces(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), 12))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def stream(parser, text: str, seed: int) -> StreamPiece:
    out = StreamPiece()
    for part in pieces(text, seed):
        piece = parser.feed(part)
        out.content += piece.content
        out.calls += piece.calls
    last = parser.finish()
    return StreamPiece(out.content + last.content, out.calls + last.calls)


def test_hermes_parses_calls_and_content_whole_and_streamed():
    parsed = HermesParser().parse(HERMES_OUTPUT)
    assert parsed.content == "Let me check." and parsed.calls == HERMES_CALLS
    for seed in range(5):
        streamed = stream(HermesParser(), HERMES_OUTPUT, seed)
        assert streamed.calls == HERMES_CALLS and streamed.content.strip() == "Let me check."
    plain = "no calls here, just a < sign"
    assert HermesParser().parse(plain).calls == [] and stream(HermesParser(), plain, 0).content == plain


def test_llama3_json_parses_calls_or_leaves_content():
    text = '<|python_tag|>{"name": "add", "parameters": {"x": 1}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}'
    parsed = Llama3JsonParser().parse(text)
    assert parsed.content is None and [c.name for c in parsed.calls] == ["add", "get_weather"]
    assert json.loads(parsed.calls[1].arguments) == {"city": "Oslo"}
    assert stream(Llama3JsonParser(), text, 1).calls == parsed.calls
    assert Llama3JsonParser().parse("Hello there").calls == []
    assert stream(Llama3JsonParser(), "Hello there, friend", 2).content == "Hello there, friend"


def test_required_scanner_cuts_a_stream_into_names_and_argument_fragments():
    text = '[{"name": "add", "arguments": {"x":1,"s":"a}\\"]"}},{"name": "get_weather", "arguments": {"city":"P"}}]'
    for seed in range(5):
        scanner, names, args = RequiredCallsScanner(), {}, {}
        for part in pieces(text, seed):
            for event in scanner.feed(part):
                if event.name is not None:
                    names[event.index] = event.name
                args[event.index] = args.get(event.index, "") + event.arguments
        assert names == {0: "add", 1: "get_weather"}
        assert json.loads(args[0]) == {"x": 1, "s": 'a}"]'} and json.loads(args[1]) == {"city": "P"}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from tiny_models import save_byte_tokenizer
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tok")
    save_byte_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return ServingContext(None, tokenizer, "m", 200, 320, ServerConfig(), grammars=GrammarCompiler(tokenizer, 320, {256}))


def chat(ctx, **body):
    req = validate(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]} | body)
    return openai.chat_constraints(ctx, req)


def refused(call, *args, **body) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        call(*args, **body)
    return info.value


def test_tool_choice_errors_name_the_field(ctx):
    auto = refused(chat, ctx, tools=TOOLS, tool_choice="auto")
    assert auto.param == "tool_choice" and "--enable-auto-tool-choice" in auto.message and "--tool-call-parser" in auto.message
    assert refused(chat, ctx, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}).param == "tool_choice"
    assert refused(chat, ctx, tool_choice="required").param == "tool_choice"
    no_params = [{"type": "function", "function": {"name": "f"}}]
    assert "parameters" in refused(chat, ctx, tools=no_params, tool_choice="required").message
    bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}}]
    assert "tools[0].function.parameters" in refused(chat, ctx, tools=bad_schema).message
    fmt = {"type": "json_object"}
    assert refused(chat, ctx, tools=TOOLS, tool_choice="required", response_format=fmt).param == "response_format"
    assert chat(ctx, tools=TOOLS)[1].choice == "none"  # auto is the default only where the server enables it


def test_constraint_errors_name_the_field(ctx):
    def completion(**body):
        req = validate(CompletionRequest, {"prompt": "x"} | body)
        return openai.completion_prompts(ctx, req)

    cases = {
        "guided_json": {"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/missing"}}}},
        "guided_regex": {"guided_regex": "a(b"},
        "guided_choice": {"guided_choice": []},
        "guided_grammar": {"guided_grammar": "start: missing_rule"},
        "response_format": {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "structured_outputs": {"structured_outputs": {"jsn": {}}},
    }
    for param, body in cases.items():
        assert refused(completion, **body).param.startswith(param), param
    huge = {"type": "object", "properties": {f"k{i}": {"enum": ["v" * 50]} for i in range(2000)}}
    assert "too large" in refused(completion, guided_json=huge).message
    assert refused(completion, guided_regex="a", guided_choice=["b"]).param == "guided_choice"
    # Compilation is bounded in time: with the compile threads busy, the request gets a 400.
    compiler = GrammarCompiler(ctx.tokenizer, 320, {256}, timeout_s=0.2)
    slow = ServingContext(None, ctx.tokenizer, "m", 200, 320, ServerConfig(), grammars=compiler)
    release = threading.Event()
    for _ in range(2):
        compiler._pool.submit(release.wait)
    try:
        late = refused(openai.completion_prompts, slow, validate(CompletionRequest, {"prompt": "x", "guided_regex": "[a-z]{1,40}q"}))
    finally:
        release.set()
    assert late.param == "guided_regex" and "longer than" in late.message
    assert openai.completion_prompts(slow, validate(CompletionRequest, {"prompt": "x", "guided_regex": "[a-z]{1,40}q"}))
