"""OpenAI's Responses API through the official openai client, against a live server on a tiny
random model: text from a string or items (with instructions), forced function calls that
validate against their schemas and a function_call_output turn after them, text.format
json_schema, a cut answer is incomplete, a stream reassembles into the whole answer, stored
responses continue a conversation and can be read back and deleted, and bad inputs are 400s
naming the field while the server goes on serving."""

import json

import httpx
import jsonschema
import openai
import pytest
from live_server import start_server
from openai._models import construct_type
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent as RawResponseStreamEvent

from stepserve.server.answer import Answer, CallArguments, CallStart, ContentPiece, ReasoningPiece
from stepserve.server.responses_output import Counts, ResponseEvents, output_items

pytestmark = pytest.mark.slow

MODEL = "tiny"
FORCE = {"ignore_eos": True}  # a random model may sample EOS; counts below need every token
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
    {"type": "function", "name": "add", "description": "x + y", "parameters": ADD, "strict": True},
    {"type": "function", "name": "get_weather", "parameters": WEATHER},
]
SCHEMA_OF = {"add": ADD, "get_weather": WEATHER}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    args = ["--model", str(tiny_llama), "--model_name", MODEL, "--max-model-len", "512", "--num-blocks", "256"]
    args += ["--tool-call-parser", "hermes", "--enable-auto-tool-choice"]
    live = start_server(args, tmp_path_factory.mktemp("logs") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _items(response) -> list[tuple]:
    """The output without its generated ids: what two runs of one request share."""
    out = []
    for item in response.output:
        if item.type == "function_call":
            out.append((item.type, item.name, item.arguments, item.status))
        else:
            out.append((item.type, item.status, [part.text for part in item.content or ()]))
    return out


def test_text_from_a_string_or_items_with_instructions(client):
    kw = dict(model=MODEL, max_output_tokens=6, temperature=0, extra_body=FORCE)
    plain = client.responses.create(input="hi", metadata={"k": "v"}, **kw)
    assert plain.id.startswith("resp_") and plain.object == "response" and plain.model == MODEL
    assert plain.status == "incomplete" and plain.incomplete_details.reason == "max_output_tokens"
    [message] = plain.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and plain.output_text == message.content[0].text
    assert plain.usage.output_tokens == 6 and plain.usage.input_tokens > 2
    assert plain.usage.total_tokens == plain.usage.input_tokens + 6
    assert plain.metadata == {"k": "v"} and plain.store is True and plain.max_output_tokens == 6
    # The same user turn as an item: the same prompt, the same greedy answer.
    parts = [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
    items = client.responses.create(input=parts, **kw)
    assert items.output_text == plain.output_text and items.usage.input_tokens == plain.usage.input_tokens
    typed = client.responses.create(input=[{"type": "message", "role": "user", "content": "hi"}], **kw)
    assert typed.output_text == plain.output_text
    # Thinking from an earlier answer is left out of the prompt, as chat templates leave it out.
    thought = {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]}
    dropped = client.responses.create(input=[thought, *parts], **kw)
    assert dropped.usage.input_tokens == plain.usage.input_tokens and dropped.output_text == plain.output_text
    # Instructions come first, as a system message.
    told = client.responses.create(input="hi", instructions="be brief", **kw)
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    same = client.responses.create(input=system, **kw)
    assert told.instructions == "be brief" and told.usage.input_tokens > plain.usage.input_tokens
    assert (told.output_text, told.usage.input_tokens) == (same.output_text, same.usage.input_tokens)


def test_an_answer_that_ends_is_completed(client):
    out = client.responses.create(
        model=MODEL, input="x", max_output_tokens=200, temperature=1.0, extra_body={"seed": 5}
    )
    if out.usage.output_tokens < 200:
        assert out.status == "completed" and out.incomplete_details is None
        assert out.output[0].status == "completed"


def _check_calls(response, names=None):
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and all(item.type == "function_call" for item in response.output)
    for call in calls:
        assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
        jsonschema.validate(json.loads(call.arguments), SCHEMA_OF[call.name])
    if names is not None:
        assert [c.name for c in calls] == names
    return calls


def test_forced_calls_validate_and_a_function_call_output_continues(client):
    kw = dict(
        model=MODEL, input="add 1 and 2", tools=TOOLS, max_output_tokens=300, temperature=0.8, extra_body={"seed": 4}
    )
    named = client.responses.create(tool_choice={"type": "function", "name": "add"}, **kw)
    [call] = _check_calls(named, ["add"])
    assert named.status == "completed" and named.tool_choice.name == "add"
    assert [t.name for t in named.tools] == ["add", "get_weather"]
    required = client.responses.create(tool_choice="required", parallel_tool_calls=False, **kw)
    assert len(_check_calls(required)) == 1
    # The calls and their output go back as input; the conversation continues with text.
    history = [{"role": "user", "content": "add 1 and 2"}, *named.output]
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": "3"})
    after = client.responses.create(
        model=MODEL, input=history, tools=TOOLS, tool_choice="none", max_output_tokens=5, temperature=0
    )
    assert after.output[0].type == "message" and after.usage.input_tokens > named.usage.input_tokens


def test_text_format_json_schema_answers_validate(client):
    fmt = {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}
    for seed in range(3):
        out = client.responses.create(
            model=MODEL,
            input="weather?",
            text={"format": fmt},
            max_output_tokens=200,
            temperature=1.0,
            extra_body={"seed": seed},
        )
        assert out.text.format.type == "json_schema" and out.text.format.name == "weather"
        if out.status == "completed":
            jsonschema.validate(json.loads(out.output_text), WEATHER)
    obj = client.responses.create(
        model=MODEL, input="x", text={"format": {"type": "json_object"}}, max_output_tokens=60, temperature=0
    )
    assert obj.output_text.startswith("{")


def _streamed(client, **kw):
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    return events, final


def test_a_stream_reassembles_into_the_whole_answer(client):
    cases = [
        dict(input="hello", max_output_tokens=24, temperature=0),
        dict(input="hi", tools=TOOLS, tool_choice="required", max_output_tokens=300, temperature=0.8),
        dict(input="hi", tools=TOOLS, tool_choice={"type": "function", "name": "get_weather"}, temperature=0.8),
    ]
    compared = 0
    for kw in cases:
        kw = dict(model=MODEL, extra_body={"seed": 4}, **kw)
        whole = client.responses.create(**kw)
        if whole.status != "completed":
            continue  # get_final_response needs response.completed
        compared += 1
        events, final = _streamed(client, **kw)
        assert _items(final) == _items(whole) and final.output_text == whole.output_text
        assert final.usage.output_tokens == whole.usage.output_tokens
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
        assert events[-1].type == "response.completed" and events[-1].response.id == final.id
    assert compared >= 2
    # A cut answer streams to response.incomplete, its text in the deltas.
    raw = list(client.responses.create(model=MODEL, input="x", max_output_tokens=4, stream=True, extra_body=FORCE))
    kinds = [e.type for e in raw]
    assert kinds[-1] == "response.incomplete" and raw[-1].response.incomplete_details.reason == "max_output_tokens"
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    text = "".join(e.delta for e in raw if e.type == "response.output_text.delta")
    assert text == raw[-1].response.output[0].content[0].text and raw[-1].response.usage.output_tokens == 4


def test_reasoning_and_calls_stream_as_the_client_reassembles_them():
    # Without a reasoning model: the pieces answer.py reads from one, through the events the
    # server sends, into the openai client's own stream state.
    pieces = [
        ReasoningPiece("let me "),
        ReasoningPiece("think"),
        ContentPiece("Sure."),
        CallStart(0, "call_a", "add"),
        CallArguments(0, '{"x": 1,'),
        CallArguments(0, ' "y": 2}'),
        CallStart(1, "call_b", "add"),
        CallArguments(1, '{"x": 3, "y": 4}'),
    ]
    events = ResponseEvents({"id": "resp_1", "object": "response", "created_at": 0, "model": MODEL, "tools": []})
    sent = events.start() + [e for piece in pieces for e in events.piece(piece)]
    closing, body = events.finish("tool_calls", Counts(10, 0, 20, 5))
    sent += closing
    assert [e["sequence_number"] for e in sent] == list(range(len(sent)))
    kinds = [e["type"] for e in sent]
    assert kinds.index("response.output_item.done") < kinds.index("response.output_text.delta")  # thinking first
    state = ResponseStreamState(input_tools=openai.omit, text_format=openai.omit)
    for event in sent:
        state.handle_event(construct_type(type_=RawResponseStreamEvent, value=event))
    final = state._completed_response
    calls = [{"id": "call_a", "function": {"name": "add", "arguments": '{"x": 1, "y": 2}'}}]
    calls.append({"id": "call_b", "function": {"name": "add", "arguments": '{"x": 3, "y": 4}'}})
    whole = output_items(Answer("let me think", "Sure.", calls, "tool_calls", 5))
    assert _items(final) == [
        ("reasoning", "completed", ["let me think"]),
        ("message", "completed", ["Sure."]),
        ("function_call", "add", '{"x": 1, "y": 2}', "completed"),
        ("function_call", "add", '{"x": 3, "y": 4}', "completed"),
    ]
    assert [{k: v for k, v in item.items() if k != "id"} for item in whole] == [
        {k: v for k, v in item.items() if k != "id"} for item in body["output"]
    ]
    assert final.usage.output_tokens_details.reasoning_tokens == 5 and final.status == "completed"


def test_stored_responses_continue_read_back_and_delete(client):
    kw = dict(model=MODEL, max_output_tokens=6, temperature=0, extra_body=FORCE)
    first = client.responses.create(input="hi", **kw)
    second = client.responses.create(input="more", previous_response_id=first.id, **kw)
    assert second.previous_response_id == first.id
    # The stored conversation is prepended: as if the client had sent it all.
    explicit = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "more"},
    ]
    whole = client.responses.create(input=explicit, store=False, **kw)
    assert (second.output_text, second.usage.input_tokens) == (whole.output_text, whole.usage.input_tokens)
    third = client.responses.create(input="again", previous_response_id=second.id, **kw)
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    client.responses.delete(first.id)
    for read in (lambda: client.responses.retrieve(first.id), lambda: client.responses.delete(first.id)):
        with pytest.raises(openai.NotFoundError):
            read()
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(input="x", previous_response_id="resp_nope", **kw)
    assert unknown.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):  # store=false is not kept
        client.responses.retrieve(whole.id)
    # A streamed response is stored too, as it ended.
    events = list(client.responses.create(input="hi", stream=True, **kw))
    streamed = events[-1].response
    assert (
        streamed.status == "incomplete" and client.responses.retrieve(streamed.id).model_dump() == streamed.model_dump()
    )


def test_reasoning_effort_reaches_the_template_and_is_echoed(server, client):
    out = client.responses.create(model=MODEL, input="hi", reasoning={"effort": "low"}, max_output_tokens=3)
    assert out.reasoning.effort == "low" and out.reasoning.summary is None
    resp = httpx.post(server.url + "/openai/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2})
    assert resp.status_code == 200 and resp.json()["object"] == "response"


BAD = [
    ({"input": "hi", "foo": 1}, "foo"),
    ({"input": "hi", "text": {"format": {"type": "text"}, "verbosity": "low"}}, "text.verbosity"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f"}], "tool_choice": "required"}, "tools"),
    ({"input": "hi", "tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "hi", "reasoning": {"summary": "auto"}}, "reasoning"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "strin"}}}}, None),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text"),
    ({"input": "hi", "truncation": "auto"}, "truncation"),
    ({"input": "hi", "include": ["reasoning.encrypted_content"]}, "include"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": 100000}, "max_output_tokens"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
]


def test_bad_inputs_are_400s_naming_the_field_and_the_server_goes_on(server, client):
    for body, param in BAD:
        resp = httpx.post(server.url + "/v1/responses", json={"model": MODEL, **body}, timeout=30)
        assert resp.status_code == 400, (body, resp.text)
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == 400 and error["message"]
        assert error["param"] == (param or "text.format"), (body, error)
        assert "response_format" not in error["message"] and "max_tokens" not in error["message"].replace(
            "max_output_tokens", ""
        )
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model=MODEL, input="hi", tools=[{"type": "web_search"}])
    assert bad.value.body["param"] == "tools"
    other = httpx.post(server.url + "/v1/responses", json={"model": "other", "input": "hi"})
    assert other.status_code == 404 and other.json()["error"]["param"] == "model"
    out = client.responses.create(model=MODEL, input="hi", max_output_tokens=3)
    assert out.status in ("completed", "incomplete")
