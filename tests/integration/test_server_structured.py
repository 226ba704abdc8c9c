"""Structured output and tool calls through the official openai client, against a live server
on a tiny random model at --num-scheduler-steps 8: constrained and free requests side by side,
streamed and not; forced tool calls validate against their schemas; auto with the hermes
parser; bad inputs are 400s naming the field, and the server serves the next request."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from json_schemas import SCHEMAS
from live_server import start_server

MODEL = "tiny"
USER = [{"role": "user", "content": "hi"}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 99},
        "y": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["x", "y"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "x + y", "parameters": ADD}},
]
SCHEMA_OF = {"get_weather": WEATHER, "add": ADD}


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
        "--num-scheduler-steps",
        "8",
        "--tool-call-parser",
        "hermes",
        "--enable-auto-tool-choice",
    ]
    live = start_server(args, tmp_path_factory.mktemp("logs") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _json_answer(client, i: int, schema: dict) -> tuple[str, str]:
    fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": f"q{i}"}],
        response_format=fmt,
        max_tokens=100,
        temperature=1.0,
        seed=i,
    )
    if i % 2:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].choices[
            0
        ].finish_reason
    out = client.chat.completions.create(**kw).choices[0]
    return out.message.content, out.finish_reason


def _free_answer(client, i: int) -> bool:
    kw = dict(model=MODEL, messages=USER, max_tokens=24, temperature=1.0)
    if i % 2:
        return bool(list(client.chat.completions.create(stream=True, **kw)))
    return client.chat.completions.create(**kw).choices[0].finish_reason in ("stop", "length")


def test_json_schema_answers_validate_in_a_mixed_streamed_batch(client):
    schemas = SCHEMAS[::2]
    with ThreadPoolExecutor(16) as pool:
        free = [pool.submit(_free_answer, client, i) for i in range(6)]
        answers = list(pool.map(lambda args: _json_answer(client, *args), enumerate(schemas)))
        assert all(f.result() for f in free)
    stopped = [(text, schema) for (text, reason), schema in zip(answers, schemas) if reason == "stop"]
    assert len(stopped) >= len(schemas) // 2
    for text, schema in stopped:
        jsonschema.validate(json.loads(text), schema)


def test_completions_take_vllm_constraints(client):
    def text(**extra):
        out = client.completions.create(
            model=MODEL, prompt="x", max_tokens=40, temperature=1.0, extra_body=extra
        ).choices[0]
        assert out.finish_reason == "stop"
        return out.text

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text(guided_regex=r"[0-9]{3}-[a-z]{2}"))
    assert text(structured_outputs={"choice": ["alpha", "beta"]}) in ("alpha", "beta")
    assert text(guided_choice=["one", "two"]) in ("one", "two")
    jsonschema.validate(json.loads(text(structured_outputs={"json": SCHEMAS[3]})), SCHEMAS[3])
    obj = client.completions.create(
        model=MODEL, prompt="x", max_tokens=60, temperature=0, extra_body={"response_format": {"type": "json_object"}}
    ).choices[0]
    assert obj.text.startswith("{") and (obj.finish_reason == "length" or isinstance(json.loads(obj.text), dict))


def _check_calls(calls, finish_reason):
    assert finish_reason == "tool_calls" and calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def test_required_and_named_tool_calls_validate_streamed_and_not(client):
    named = {"type": "function", "function": {"name": "add"}}
    for choice, parallel in (("required", False), ("required", True), (named, True)):
        kw = dict(
            model=MODEL,
            messages=USER,
            tools=TOOLS,
            tool_choice=choice,
            parallel_tool_calls=parallel,
            max_tokens=400,
            temperature=0.8,
            seed=4,
        )
        out = client.chat.completions.create(**kw).choices[0]
        if out.finish_reason == "length":
            continue  # parallel calls of a random model may run past max_tokens
        _check_calls(out.message.tool_calls, out.finish_reason)
        assert out.message.content is None
        if choice is named:
            assert [c.function.name for c in out.message.tool_calls] == ["add"]
        with client.beta.chat.completions.stream(**kw) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion().choices[0]
        _check_calls(final.message.tool_calls, final.finish_reason)
        # The same seed: the stream reassembles exactly the calls of the whole answer.
        assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
            (c.function.name, c.function.arguments) for c in out.message.tool_calls
        ]


def test_auto_parses_hermes_calls_end_to_end(client):
    # The random model is made to write a Hermes call (a regex constraint); the hermes parser
    # then turns its text into tool_calls, whole and streamed.
    regex = r'Sure\.<tool_call>\{"name": "add", "arguments": \{"x": [0-9], "y": [0-9]\}\}</tool_call>'
    kw = dict(
        model=MODEL,
        messages=USER,
        tools=TOOLS,
        tool_choice="auto",
        max_tokens=100,
        seed=3,
        extra_body={"guided_regex": regex},
    )
    out = client.chat.completions.create(**kw).choices[0]
    _check_calls(out.message.tool_calls, out.finish_reason)
    assert out.message.content == "Sure."
    with client.beta.chat.completions.stream(**kw) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion().choices[0]
    _check_calls(final.message.tool_calls, final.finish_reason)
    assert final.message.content == "Sure."
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in out.message.tool_calls
    ]
    # As OpenAI streams calls: content first, then the call's id, type and name with arguments
    # "", then its arguments in fragments as the model writes them, and finish_reason tool_calls.
    deltas = [c.choices[0] for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    kinds = ["content" if d.delta.content else "call" for d in deltas if d.delta.content or d.delta.tool_calls]
    assert kinds[0] == "content" and set(kinds[kinds.index("call") :]) == {"call"}
    calls = [d.delta.tool_calls[0] for d in deltas if d.delta.tool_calls]
    assert calls[0].id.startswith("call_") and calls[0].type == "function" and calls[0].function.name == "add"
    assert calls[0].function.arguments == "" and all(c.id is None and c.function.name is None for c in calls[1:])
    assert (
        len(calls) > 2 and "".join(c.function.arguments for c in calls) == out.message.tool_calls[0].function.arguments
    )
    assert deltas[-1].finish_reason == "tool_calls"


def test_tool_choice_none_gives_text_and_history_is_accepted(client):
    out = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0
    ).choices[0]
    assert out.message.tool_calls is None and isinstance(out.message.content, str)
    history = USER + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"x": 1, "y": 2}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    out = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


BAD = {
    "response_format": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}
    },
    "tool_choice": {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    "tools": {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
    "guided_json": {
        "guided_json": {"type": "object", "properties": {f"k{i}": {"const": "v" * 64} for i in range(1200)}}
    },
    "guided_regex": {"guided_regex": "(unclosed"},
}


def test_bad_inputs_are_400s_naming_the_field_and_the_next_request_is_served(server, client):
    for param, body in BAD.items():
        resp = httpx.post(
            server.url + "/v1/chat/completions", json={"model": MODEL, "messages": USER, **body}, timeout=30
        )
        assert resp.status_code == 400, (param, resp.text)
        assert resp.json()["error"]["param"] == param
        out = client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=4, response_format={"type": "json_object"}
        )
        assert out.choices[0].finish_reason in ("stop", "length")


def test_prompt_logprobs_echo_and_the_rest_of_the_request_surface(server, client):
    out = client.completions.create(
        model=MODEL, prompt="hello there", max_tokens=3, echo=True, logprobs=2, temperature=0
    )
    lp = out.choices[0].logprobs
    assert out.choices[0].text.startswith("hello there") and lp.token_logprobs[0] is None
    assert all(isinstance(v, float) for v in lp.token_logprobs[1:]) and len(lp.tokens) == len("hello there") + 3
    assert all(top for top in lp.top_logprobs[1:])  # text -> logprob: byte tokens may share a text
    streamed = list(
        client.completions.create(
            model=MODEL, prompt="hello there", max_tokens=3, echo=True, logprobs=2, temperature=0, stream=True
        )
    )
    assert [v for c in streamed for v in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 2, "prompt_logprobs": 1}
    choice = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == 3
    assert all(any(e["rank"] == 1 for e in entry.values()) for entry in choice["prompt_logprobs"][1:])
    chat = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": USER, "max_tokens": 2, "prompt_logprobs": 0},
    ).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    many = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=3, n=3, logprobs=True, top_logprobs=2, temperature=1.0
    )
    assert all(
        len(c.logprobs.content) == 3 and all(len(t.top_logprobs) == 2 for t in c.logprobs.content) for c in many.choices
    )
    refusals = [
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ]
    for route, body, param in refusals:
        resp = httpx.post(server.url + route, json={"model": MODEL, **body})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, (body, resp.text)
    # As in vLLM, prompt logprobs are not streamed; the message names the field and says why.
    for route, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": USER})):
        error = httpx.post(
            server.url + route, json={"model": MODEL, "prompt_logprobs": 0, "stream": True, **body}
        ).json()["error"]
        assert (
            error["param"] == "prompt_logprobs"
            and "stream=true" in error["message"]
            and "whole response" in error["message"]
        )
