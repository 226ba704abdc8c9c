"""Anthropic's Messages API through the official anthropic client, against a live server on a
tiny random model: text with a system prompt (a string or blocks) and stop sequences, forced
tool calls that validate against their input_schema, a tool_use then tool_result conversation,
a streamed message that reassembles into the non-streamed one, max_tokens, count_tokens, and
bad requests as 400s (404 for another model) in Anthropic's error shape naming the field, after
which the server serves the next request."""

import anthropic
import httpx
import jiter
import jsonschema
import pytest
from anthropic.types import Message
from live_server import start_server

from stepserve.server.anthropic import tool_input

MODEL = "tiny"
USER = [{"role": "user", "content": "hi"}]
GREEDY = {"extra_body": {"temperature": 0}}  # the 2.x client has no temperature argument
ADD = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 99},
        "y": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["x", "y"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"name": "add", "description": "x + y", "input_schema": ADD},
    {"name": "get_weather", "input_schema": WEATHER, "cache_control": {"type": "ephemeral"}},
]
SCHEMA_OF = {"add": ADD, "get_weather": WEATHER}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    args = [
        "--model",
        str(tiny_llama),
        "--model_name",
        MODEL,
        "--max-model-len",
        "512",
        "--num-blocks",
        "256",
        "--tool-call-parser",
        "hermes",
        "--enable-auto-tool-choice",
    ]
    live = start_server(args, tmp_path_factory.mktemp("logs") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def _text(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


@pytest.mark.slow
def test_text_with_a_system_prompt_as_a_string_or_blocks(client):
    kw = dict(model=MODEL, max_tokens=12, messages=USER, **GREEDY)
    plain = client.messages.create(system="Answer briefly.", **kw)
    blocks = client.messages.create(
        system=[{"type": "text", "text": "Answer briefly.", "cache_control": {"type": "ephemeral"}}],
        metadata={"user_id": "someone"},
        **kw,
    )
    assert plain.id.startswith("msg_") and plain.type == "message" and plain.role == "assistant"
    assert plain.model == MODEL and plain.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in plain.content] in (["text"], [])
    assert (_text(blocks), blocks.usage) == (_text(plain), plain.usage)
    assert 0 < plain.usage.output_tokens <= 12
    without = client.messages.create(**kw)
    assert without.usage.input_tokens < plain.usage.input_tokens  # the system prompt reached the model
    counted = client.messages.count_tokens(model=MODEL, messages=USER, system="Answer briefly.")
    assert counted.input_tokens == plain.usage.input_tokens


@pytest.mark.slow
def test_stop_sequences_end_the_text(client):
    kw = dict(model=MODEL, max_tokens=16, messages=USER, **GREEDY)
    full = _text(client.messages.create(**kw))
    stops = [full[i : i + 2] for i in range(1, len(full) - 2) if "\ufffd" not in full[i : i + 2]]
    assert stops, full
    out = client.messages.create(stop_sequences=["never-said", stops[0]], **kw)
    assert (out.stop_reason, out.stop_sequence) == ("stop_sequence", stops[0])
    assert _text(out) == full[: full.index(stops[0])]


def _check_calls(message, names) -> None:
    assert message.stop_reason == "tool_use" and message.content
    for block in message.content:
        assert block.type == "tool_use" and block.id.startswith("toolu_") and block.name in names
        jsonschema.validate(block.input, SCHEMA_OF[block.name])


@pytest.mark.slow
def test_forced_tool_calls_validate_against_their_input_schema(client):
    named = client.messages.create(
        model=MODEL, max_tokens=200, messages=USER, tools=TOOLS, tool_choice={"type": "tool", "name": "add"}
    )
    _check_calls(named, {"add"})
    assert len(named.content) == 1
    for parallel in (False, True):
        choice = {"type": "any", "disable_parallel_tool_use": not parallel}
        out = client.messages.create(model=MODEL, max_tokens=400, messages=USER, tools=TOOLS, tool_choice=choice)
        if out.stop_reason == "max_tokens":
            continue  # parallel calls of a random model may run past max_tokens
        _check_calls(out, set(SCHEMA_OF))
        assert parallel or len(out.content) == 1
    none = client.messages.create(model=MODEL, max_tokens=4, messages=USER, tools=TOOLS, tool_choice={"type": "none"})
    assert all(block.type == "text" for block in none.content)


@pytest.mark.slow
def test_a_tool_use_then_tool_result_conversation(client):
    kw = dict(model=MODEL, tools=TOOLS, **GREEDY)
    call = client.messages.create(max_tokens=200, messages=USER, tool_choice={"type": "tool", "name": "add"}, **kw)
    _check_calls(call, {"add"})
    result = {"type": "tool_result", "tool_use_id": call.content[0].id, "content": [{"type": "text", "text": "3"}]}
    conversation = USER + [
        {"role": "assistant", "content": call.content},
        {"role": "user", "content": [result, {"type": "text", "text": "and now?"}]},
    ]
    answer = client.messages.create(max_tokens=8, messages=conversation, **kw)
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert client.messages.count_tokens(model=MODEL, messages=conversation, tools=TOOLS).input_tokens == (
        answer.usage.input_tokens
    )
    # An earlier turn's thinking is dropped from the prompt; a failed tool's result is marked.
    thought = {"type": "thinking", "thinking": "let me add", "signature": "opaque"}
    conversation[1] = {"role": "assistant", "content": [thought, *call.content]}
    again = client.messages.create(max_tokens=8, messages=conversation, **kw)
    assert (_text(again), again.usage) == (_text(answer), answer.usage)
    conversation[2] = {"role": "user", "content": [result | {"is_error": True, "content": "3"}]}
    failed = client.messages.count_tokens(model=MODEL, messages=conversation, tools=TOOLS)
    assert (
        failed.input_tokens
        > client.messages.count_tokens(
            model=MODEL, messages=conversation[:2] + [{"role": "user", "content": [result]}], tools=TOOLS
        ).input_tokens
    )


def test_tool_input_reads_arguments_as_the_client_reads_a_streamed_input():
    cases = ('{"city": "Paris", "days": 3}', '{"city": "Paris", "da', '{"city": "Par', '{"a": [1, 2', "{", '{"a": 1} x')
    for arguments in cases:
        assert tool_input(arguments) == jiter.from_json(arguments.encode(), partial_mode=True), arguments
    assert tool_input('{"city": "Paris", "da') == {"city": "Paris"}
    for broken in ("", "not json", "[1, 2]", '"text"'):
        assert tool_input(broken) == {}, broken


def _comparable(message) -> tuple:
    blocks = [block.model_dump(exclude={"id", "parsed_output"}) for block in message.content]
    return blocks, message.stop_reason, message.stop_sequence, message.usage.model_dump(), message.model


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        {"max_tokens": 24},
        {"max_tokens": 200, "tools": TOOLS, "tool_choice": {"type": "tool", "name": "get_weather"}},
        {"max_tokens": 400, "tools": TOOLS, "tool_choice": {"type": "any"}},
        {"max_tokens": 12, "tools": TOOLS, "tool_choice": {"type": "tool", "name": "get_weather"}},  # a cut call
    ],
)
def test_a_streamed_message_reassembles_into_the_whole_one(client, extra):
    kw = dict(model=MODEL, messages=USER, **GREEDY, **extra)
    whole = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert _comparable(streamed) == _comparable(whole)
    assert all(block.id.startswith("toolu_") for block in streamed.content if block.type == "tool_use")
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_stop") == len(streamed.content)


@pytest.mark.slow
def test_max_tokens_cuts_the_answer(client):
    out = client.messages.create(model=MODEL, max_tokens=3, messages=USER, **GREEDY)
    assert (out.stop_reason, out.usage.output_tokens) == ("max_tokens", 3)


BAD = [  # (the client's exception, Anthropic's error type, the body, words its message names)
    (anthropic.BadRequestError, "invalid_request_error", {"model": MODEL, "messages": USER}, ["max_tokens"]),
    (anthropic.BadRequestError, "invalid_request_error", {"max_tokens": 4, "messages": USER, "top_n": 2}, ["top_n"]),
    (
        anthropic.BadRequestError,
        "invalid_request_error",
        {
            "max_tokens": 4,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}],
                }
            ],
        },
        ["image", "messages[0].content[0]"],
    ),
    (
        anthropic.BadRequestError,
        "invalid_request_error",
        {"max_tokens": 4000, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 2000}},
        ["thinking", "--reasoning-parser"],
    ),
    (anthropic.NotFoundError, "not_found_error", {"model": "other", "max_tokens": 4, "messages": USER}, ["other"]),
    (
        anthropic.BadRequestError,
        "invalid_request_error",
        {"max_tokens": 4, "messages": USER, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        ["tools[0].type", "web_search_20250305"],
    ),
    (
        anthropic.BadRequestError,
        "invalid_request_error",
        {"max_tokens": 4, "messages": [*USER, {"role": "assistant", "content": "The answer is"}]},
        ["messages[1]", "prefill"],
    ),
    (
        anthropic.BadRequestError,
        "invalid_request_error",
        {"max_tokens": 4, "messages": USER, "stop_sequences": [""], "stream": True},
        ["stop_sequences"],
    ),
    (
        anthropic.BadRequestError,
        "invalid_request_error",
        {"max_tokens": 4, "messages": USER, "tools": [{"name": "f", "input_schema": {"type": "array"}}]},
        ["tools[0].input_schema"],
    ),
    (
        anthropic.BadRequestError,
        "invalid_request_error",
        {"max_tokens": 4, "messages": USER, "service_tier": "auto"},
        ["service_tier"],
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("error, kind, body, named", BAD)
def test_bad_requests_name_the_field_in_anthropics_shape_and_the_next_is_served(client, error, kind, body, named):
    with pytest.raises(error) as info:
        client.post("/v1/messages", cast_to=Message, body={"model": MODEL} | body)
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == kind
    assert all(word in info.value.body["error"]["message"] for word in named), info.value.body
    assert client.messages.create(model=MODEL, max_tokens=2, messages=USER).usage.output_tokens <= 2


@pytest.mark.slow
def test_streamed_events_are_named_and_end_without_done(server):
    body = {"model": MODEL, "max_tokens": 3, "messages": USER, "stream": True, "temperature": 0}
    text = httpx.post(server.url + "/v1/messages", json=body, timeout=60).text
    events = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    assert events[:2] == ["message_start", "ping"] and events[-2:] == ["message_delta", "message_stop"]
    assert "[DONE]" not in text
