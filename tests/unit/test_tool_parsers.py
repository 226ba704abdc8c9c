"""Tool-call parsing (canned model outputs, whole and streamed at every chunk boundary), the
``required`` stream scanner, and the front end's 400s for constraints and tools."""

import asyncio
import json
import random
import threading

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from stepserve.errors import InvalidRequestError
from stepserve.server.config import ServerConfig
from stepserve.server.plan import output_constraint, plan, plan_chat, plan_completion
from stepserve.server.context import ServingContext
from stepserve.server.schemas import ChatCompletionRequest, CompletionRequest, validate
from stepserve.server.answer import AnswerStream, final_answer
from stepserve.server.openai import chat_delta, chat_message
from stepserve.server.tool_calls import ToolMode
from stepserve.structured.compiler import GrammarCompiler
from stepserve.structured.tool_parsers import Parsed, assemble, make_parser
from stepserve.structured.tools import RequiredCallsScanner, ScanEvent, ToolCall

# Canned outputs of each format, with the content and calls they must give. Arguments are the
# model's own text: strings with escaped quotes and backslashes, braces and end tags inside strings.
HERMES_ARGS_1 = '{"city": "Pa\\"ris \\\\ </tool_call> {", "unit": "c"}'
HERMES_ARGS_2 = '{"x": 1, "y": [2, "}"], "z": "\\u00e9\\n"}'
CASES = {
    "hermes": [
        (
            'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": ' + HERMES_ARGS_1 + "}\n</tool_call>\n"
            '<tool_call>\n{"arguments": ' + HERMES_ARGS_2 + ', "name": "add"}\n</tool_call>',
            Parsed("Let me check.", [ToolCall("get_weather", HERMES_ARGS_1), ToolCall("add", HERMES_ARGS_2)]),
        ),
        (
            '<tool_call>{"name": "f", "id": 7, "arguments": "{\\"a\\": 1}"}</tool_call> Done.\n',
            Parsed("Done.\n", [ToolCall("f", '{"a": 1}')]),
        ),
        ('<tool_call>{"name": "f"}</tool_call>', Parsed(None, [ToolCall("f", "{}")])),
        (
            '<tool_call>{"name": "f", "arguments": {"a": "b',
            Parsed(None, [ToolCall("f", '{"a": "b')]),
        ),  # cut by max_tokens
        # Not calls: the text comes back unchanged.
        ("no calls here, just a < sign and <tool_ \n", Parsed("no calls here, just a < sign and <tool_ \n", [])),
        ("x <tool_call>oops</tool_call> y", Parsed("x <tool_call>oops</tool_call> y", [])),
        (
            '<tool_call>{"nam": "f", "arguments": {}}</tool_call>',
            Parsed('<tool_call>{"nam": "f", "arguments": {}}</tool_call>', []),
        ),
        ('a\n<tool_call>{"name": 5}', Parsed('a\n<tool_call>{"name": 5}', [])),
        ("<tool_call>", Parsed("<tool_call>", [])),
    ],
    "llama3_json": [
        (
            '<|python_tag|>{"name": "add", "parameters": {"x": 1}}; '
            '{"name": "get_weather", "parameters": {"city": "O\\"slo"}}',
            Parsed(None, [ToolCall("add", '{"x": 1}'), ToolCall("get_weather", '{"city": "O\\"slo"}')]),
        ),
        (
            '\n{"type": "function", "name": "add", "parameters": {"x": [1, {"y": "}"}]}}\nThat is all.',
            Parsed("That is all.", [ToolCall("add", '{"x": [1, {"y": "}"}]}')]),
        ),
        ("Hello there, friend {not json}", Parsed("Hello there, friend {not json}", [])),
        (' {"nam": 1} x', Parsed(' {"nam": 1} x', [])),
        ("<|python_tag|>print(1)", Parsed("<|python_tag|>print(1)", [])),
    ],
    "mistral": [
        (
            'Sure. [TOOL_CALLS] [{"name": "add", "arguments": {"x": 1, "s": "]\\""}}, '
            '{"name": "mul", "arguments": {"y": [1, 2]}}]',
            Parsed("Sure.", [ToolCall("add", '{"x": 1, "s": "]\\""}'), ToolCall("mul", '{"y": [1, 2]}')]),
        ),
        (
            '[TOOL_CALLS]add[ARGS]{"x": 1, "s": "[TOOL_CALLS]"}[TOOL_CALLS]mul{"y": {"z": 2}}',
            Parsed(None, [ToolCall("add", '{"x": 1, "s": "[TOOL_CALLS]"}'), ToolCall("mul", '{"y": {"z": 2}}')]),
        ),
        (
            'Let me see.[TOOL_CALLS]get.weather_2[CALL_ID]abc123XYZ[ARGS]{"city": "Nice"}',
            Parsed("Let me see.", [ToolCall("get.weather_2", '{"city": "Nice"}', "abc123XYZ")]),
        ),
        ("[TOOL_CALLS] hello world", Parsed("[TOOL_CALLS] hello world", [])),
        ("[TOOLS] and [TOOL_CALLS]", Parsed("[TOOLS] and [TOOL_CALLS]", [])),
        ('[TOOL_CALLS] [{"x": 1}]', Parsed('[TOOL_CALLS] [{"x": 1}]', [])),
    ],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {
        "type": "function",
        "function": {"name": "add", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}},
    },
]
ALL_CASES = [(name, text, want) for name, cases in CASES.items() for text, want in cases]


def run_pieces(name: str, pieces: list[str]) -> list:
    parser = make_parser(name)
    return [item for piece in pieces for item in parser.feed(piece)] + parser.finish()


def random_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 20))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("name,text,want", ALL_CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(ALL_CASES)])
def test_parsers_give_the_same_calls_whole_and_split_at_every_boundary(name, text, want):
    assert make_parser(name).parse(text) == want
    for cut in range(len(text) + 1):  # every boundary: inside tags, names, escapes
        assert assemble(run_pieces(name, [text[:cut], text[cut:]])) == want, cut
    assert assemble(run_pieces(name, list(text))) == want  # a character at a time
    rng = random.Random(len(text))
    for _ in range(20):
        assert assemble(run_pieces(name, random_pieces(text, rng))) == want


@pytest.mark.parametrize(
    "name,text,want",
    [c for c in ALL_CASES if c[2].calls],
    ids=lambda v: v if isinstance(v, str) and len(v) < 12 else None,
)
def test_calls_stream_name_first_then_arguments_as_they_are_written(name, text, want):
    parser = make_parser(name)
    sent: dict[int, str] = {}
    fragments: dict[int, int] = {}
    for ch in text:  # a character at a time, as a byte-level model would write it
        for item in parser.feed(ch):
            if isinstance(item, ScanEvent) and item.name is not None:
                assert item.index == len(sent) and not item.arguments and item.name == want.calls[item.index].name
                sent[item.index], fragments[item.index] = "", 0
            elif isinstance(item, ScanEvent):
                assert item.index in sent  # never before its name
                sent[item.index] += item.arguments
                fragments[item.index] += 1
                # What was sent is the start of the call's arguments: they stream as written.
                assert want.calls[item.index].arguments.startswith(sent[item.index])
    parser.finish()
    for i, call in enumerate(want.calls):
        assert sent[i] == call.arguments
        at = text.find(call.arguments)
        if call.arguments != "{}" and 0 <= text.find(call.name) < at:  # written out after the name
            assert fragments[i] == len(call.arguments)  # each character went out as it came
        # (arguments written before the name, or as a JSON string, go out whole after the name)


def test_content_streams_before_a_call_completes():
    parser = make_parser("hermes")
    assert parser.feed("Checking the weather") == ["Checking the weather"]
    assert parser.feed(" now.\n<tool_") == [" now."]  # the newline and tag piece wait
    assert parser.feed('call>{"name": "get_weather", "arguments": {"ci') == [
        ScanEvent(0, name="get_weather"),
        ScanEvent(0, arguments='{"ci'),
    ]


def test_required_scanner_cuts_a_stream_into_names_and_argument_fragments():
    text = '[{"name": "add", "arguments": {"x":1,"s":"a}\\"]"}},{"name": "get_weather", "arguments": {"city":"P"}}]'
    rng = random.Random(0)
    for _ in range(5):
        scanner, names, args = RequiredCallsScanner(), {}, {}
        for part in random_pieces(text, rng):
            for event in scanner.feed(part):
                if event.name is not None:
                    names[event.index] = event.name
                args[event.index] = args.get(event.index, "") + event.arguments
        assert names == {0: "add", 1: "get_weather"}
        assert json.loads(args[0]) == {"x": 1, "s": 'a}"]'} and json.loads(args[1]) == {"city": "P"}


def reassembled(mode: ToolMode, pieces: list[str]):
    """Stream ``pieces`` as OpenAI chunks and let the openai client's stream state rebuild the message."""
    state, stream = ChatCompletionStreamState(), AnswerStream(mode)

    def chunk(delta: dict, finish_reason=None) -> ChatCompletionChunk:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return ChatCompletionChunk.model_validate(
            {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [choice]}
        )

    deltas = [{"role": "assistant", "content": ""}] + [chat_delta(p) for piece in pieces for p in stream.feed(piece)]
    pieces_left, finish_reason = stream.finish("stop")
    more = [chat_delta(p) for p in pieces_left]
    for delta in deltas + more:
        list(state.handle_chunk(chunk(delta)))
    list(state.handle_chunk(chunk({}, finish_reason)))
    return deltas + more, state.get_final_completion().choices[0]


@pytest.mark.parametrize("name", list(CASES))
def test_the_openai_client_reassembles_streamed_calls_into_the_whole_answer(name):
    mode = ToolMode("auto", parser=name)
    for text, want in CASES[name]:
        answer = final_answer(mode, None, text, (), "stop")
        whole, finish_reason = chat_message(answer, with_reasoning=False), answer.finish_reason
        deltas, final = reassembled(mode, random_pieces(text, random.Random(1)) if len(text) > 1 else [text])
        assert final.finish_reason == finish_reason == ("tool_calls" if want.calls else "stop")
        got = [(c.function.name, c.function.arguments) for c in final.message.tool_calls or []]
        assert got == [(c["function"]["name"], c["function"]["arguments"]) for c in whole.get("tool_calls", [])]
        assert got == [(c.name, c.arguments) for c in want.calls]
        assert (final.message.content or None) == whole["content"]
        firsts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
        assert all(f["type"] == "function" and f["function"]["arguments"] == "" for f in firsts)
        if name == "mistral":  # ids as Mistral's templates want them back: nine letters and digits
            assert all(len(c.id) == 9 and c.id.isalnum() for c in final.message.tool_calls or [])
            assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in whole.get("tool_calls", []))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from tiny_models import save_byte_tokenizer
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tok")
    save_byte_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return ServingContext(
        None, tokenizer, "m", 200, 320, ServerConfig(), grammars=GrammarCompiler(tokenizer, 320, {256})
    )


def chat(ctx, **body):
    req = validate(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]} | body)
    resolved = plan_chat(ctx, req)
    return resolved.inputs[0].params.structured, resolved.tools


def refused(call, *args, **body) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        call(*args, **body)
    return info.value


def test_tool_choice_errors_name_the_field(ctx):
    auto = refused(chat, ctx, tools=TOOLS, tool_choice="auto")
    assert (
        auto.param == "tool_choice"
        and "--enable-auto-tool-choice" in auto.message
        and "--tool-call-parser" in auto.message
    )
    assert (
        refused(chat, ctx, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}).param
        == "tool_choice"
    )
    assert refused(chat, ctx, tool_choice="required").param == "tool_choice"
    no_params = [{"type": "function", "function": {"name": "f"}}]
    assert "parameters" in refused(chat, ctx, tools=no_params, tool_choice="required").message
    bad_schema = [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}},
        }
    ]
    assert "tools[0].function.parameters" in refused(chat, ctx, tools=bad_schema).message
    fmt = {"type": "json_object"}
    assert refused(chat, ctx, tools=TOOLS, tool_choice="required", response_format=fmt).param == "response_format"
    assert chat(ctx, tools=TOOLS)[1].choice == "none"  # auto is the default only where the server enables it


def test_constraint_errors_name_the_field(ctx):
    def completion(**body):
        req = validate(CompletionRequest, {"prompt": "x"} | body)
        return plan_completion(ctx, req)

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
    regex = validate(CompletionRequest, {"prompt": "x", "guided_regex": "[a-z]{1,40}q"})
    release = threading.Event()
    for _ in range(2):
        compiler._pool.submit(release.wait)
    try:
        late = refused(output_constraint, slow, regex)
    finally:
        release.set()
    assert late.param == "guided_regex" and "longer than" in late.message
    assert output_constraint(slow, regex)


def test_a_slow_compile_does_not_hold_the_event_loop(ctx):
    """While a grammar is checked (up to its time bound), the server's loop serves the others."""
    compiler = GrammarCompiler(ctx.tokenizer, 320, {256}, timeout_s=0.5)
    slow = ServingContext(None, ctx.tokenizer, "m", 200, 320, ServerConfig(), grammars=compiler)
    release = threading.Event()
    for _ in range(2):
        compiler._pool.submit(release.wait)  # the compile threads are busy: this check runs to its bound
    ticks = []

    async def ticker(done: asyncio.Event):
        while not done.is_set():
            ticks.append(1)
            await asyncio.sleep(0.01)

    async def both():
        done = asyncio.Event()
        task = asyncio.create_task(ticker(done))
        try:
            await plan(slow, validate(CompletionRequest, {"prompt": "x", "guided_regex": "b+"}))
        finally:
            done.set()
            await task

    try:
        with pytest.raises(InvalidRequestError, match="longer than"):
            asyncio.run(both())
    finally:
        release.set()
    assert len(ticks) >= 20  # 0.5 s of compile bound, a tick every 10 ms: the loop ran meanwhile


def test_mistral_auto_keeps_special_tokens_and_the_parser_flag_is_checked(ctx):
    # [TOOL_CALLS] is a special token in Mistral's tokenizers: skipping special tokens would
    # hide every call from the parser, so auto mode with this parser keeps them in the text.
    config = ServerConfig(tool_call_parser="mistral", enable_auto_tool_choice=True)
    mistral = ServingContext(None, ctx.tokenizer, "m", 200, 320, config, grammars=ctx.grammars)
    req = validate(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS})
    assert plan_chat(mistral, req).inputs[0].params.skip_special_tokens is False
    plain = validate(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]})
    assert plan_chat(mistral, plain).inputs[0].params.skip_special_tokens is True
    with pytest.raises(Exception, match="hermes, llama3_json, mistral"):
        ServerConfig(tool_call_parser="nope")


def test_the_grammar_tokenizer_is_built_in_the_background_from_the_start(ctx):
    # The engine core and the front start this when they start, so the first constrained
    # request does not pay for loading the tokenizer and building llguidance's view of it.
    from stepserve.structured.compiler import ll_tokenizer_in_background

    started, threads = threading.Event(), []

    def load():
        threads.append(threading.current_thread().name)
        started.set()
        return ctx.tokenizer

    built = ll_tokenizer_in_background(load, 320, {256})
    assert started.wait(30) and threads[0].startswith("ll-tokenizer")  # begun before anyone asked
    assert built().vocab_size == 320 and built() is built()

    def broken():
        raise OSError("no tokenizer.json")

    with pytest.raises(OSError, match="no tokenizer.json"):  # a failure reaches the first constrained request
        ll_tokenizer_in_background(broken, 320, {256})()
