"""Structured output as real clients drive it, on the embedded model over HTTP
(docs/structured-output.md): LangChain's ``with_structured_output`` by ``json_schema``,
``function_calling`` and ``json_mode``, ``bind_tools`` forced and streamed, and the openai SDK's
``beta.chat.completions.parse`` with a pydantic model, each at temperature 0 and 0.8. Two cases a new
user met first: ``\\d`` in a regex is an ASCII digit (ECMA-262), and a forced tool whose schema
does not say ``additionalProperties`` gets exactly its declared properties (so a small model
cannot write an extra field until max_tokens and leave LangChain with nothing)."""

import json
import re
from typing import Annotated

import openai
import pytest
from live_server import start_server
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

MODEL = "smollm2"
TEMPERATURES = [0.0, 0.8]


class Person(BaseModel):
    """A person."""

    name: str = Field(description="the person's name")
    age: int = Field(description="age in years")


class Event(BaseModel):
    """A calendar event. Its strings are bounded (``maxLength``), so that at temperature 0.8 the
    135M model cannot ramble inside one until max_tokens: the grammar closes them."""

    title: str = Field(max_length=60)
    day: str = Field(description="ISO date", pattern=r"^\d{4}-\d{2}-\d{2}$")
    attendees: list[Annotated[str, Field(max_length=30)]] = Field(max_length=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--model_name", MODEL, "--max-model-len", "2048", "--num-scheduler-steps", "8"]
    live = start_server(args, tmp_path_factory.mktemp("logs") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _chat_model(server, temperature: float, **kw):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=MODEL,
        base_url=server.url + "/v1",
        api_key="unused",
        temperature=temperature,
        max_tokens=160,
        seed=3,
        max_retries=0,
        **kw,
    )


# -- the two cases of the issue -----------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_regex_digit_class_is_ascii(client, temperature):
    """``\\d`` was any Unicode decimal digit: the model wrote U+1FBF8 seven times."""
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "A phone number?"}],
        extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}},
        max_tokens=20,
        temperature=temperature,
        seed=1,
    )
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", out.choices[0].message.content), out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_langchain_function_calling_gets_exactly_the_declared_fields(server, temperature):
    structured = _chat_model(server, temperature).with_structured_output(Person, method="function_calling")
    person = structured.invoke("Describe a small person.")
    assert isinstance(person, Person), person


def test_regex_constructs_ecma_cannot_match_are_400s_naming_them(client):
    for pattern, named in [(r"a(?=b)", "lookahead"), (r"(a)\1", "backreference"), (r"\bword", "word boundary")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
                extra_body={"structured_outputs": {"regex": pattern}},
                max_tokens=4,
            )
        assert "structured_outputs.regex" in err.value.message and named in err.value.message


# -- LangChain ----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_langchain_with_structured_output_json_schema(server, temperature):
    structured = _chat_model(server, temperature).with_structured_output(Event, method="json_schema")
    event = structured.invoke("A team meeting next Monday with Ann, as an event.")
    assert isinstance(event, Event), event
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", event.day)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_langchain_with_structured_output_json_mode(server, temperature):
    """json_mode sends ``response_format: json_object`` (any object: the keys are the model's
    choice, and a sampled answer may run to max_tokens); every answer that stops is JSON that
    LangChain parses."""
    structured = _chat_model(server, temperature).with_structured_output(Person, method="json_mode", include_raw=True)
    prompt = "Return a JSON object with the keys name (a string) and age (an integer) of a person."
    try:
        answer = structured.invoke(prompt)
    except openai.LengthFinishReasonError:  # the client's own error for an answer cut by max_tokens
        assert temperature > 0
        return
    assert answer["parsing_error"] is None, answer
    assert isinstance(json.loads(answer["raw"].content), dict)
    if temperature == 0:
        assert isinstance(answer["parsed"], Person), answer


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_langchain_bind_tools_forced_and_streamed(server, temperature):
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str, days: int) -> str:
        """The weather forecast for a city."""
        return "sunny"

    model = _chat_model(server, temperature).bind_tools([get_weather], tool_choice="get_weather")
    whole = model.invoke("What is the weather in Paris for 3 days?")
    assert [call["name"] for call in whole.tool_calls] == ["get_weather"]
    assert set(whole.tool_calls[0]["args"]) == {"city", "days"}

    chunks = list(model.stream("What is the weather in Paris for 3 days?"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert len(chunks) > 2  # the arguments arrived in pieces
    assert [call["name"] for call in merged.tool_calls] == ["get_weather"]
    assert merged.tool_calls[0]["args"] == whole.tool_calls[0]["args"]
    assert isinstance(merged.tool_calls[0]["args"]["days"], int)


# -- the openai SDK -----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_openai_parse_with_a_pydantic_model(client, temperature):
    completion = client.beta.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "A team meeting next Monday with Ann and Bo, as an event."}],
        response_format=Event,
        max_tokens=160,
        temperature=temperature,
        seed=5,
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Event)
    assert message.parsed == Event.model_validate(json.loads(message.content))


# -- the other API surfaces on the embedded model -------------------------------------------


def test_responses_and_messages_on_the_embedded_model(server, client):
    """The Responses API (plain, structured, streamed) and Anthropic's Messages (plain, streamed)
    on a real model: text comes back in each API's shape, and streams reassemble from their
    deltas. (Greedy answers are not compared between requests: a prompt read from the prefix
    cache may round differently from one computed whole, and a near tie can turn.)"""
    import anthropic

    kw = dict(model=MODEL, input="Name one colour, in one word.", max_output_tokens=64, temperature=0)
    response = client.responses.create(**kw)
    assert response.status == "completed" and response.output_text
    with client.responses.stream(**kw) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        assert stream.get_final_response().output_text == "".join(deltas) != ""
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": Person.model_json_schema(), "strict": True}}
    parsed = client.responses.create(
        model=MODEL, input="A person, as JSON.", text=fmt, temperature=0, max_output_tokens=80
    )
    Person.model_validate_json(parsed.output_text)

    claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    kw = dict(model=MODEL, max_tokens=24, messages=[{"role": "user", "content": "Name a colour."}])
    message = claude.messages.create(**kw, extra_body={"temperature": 0})
    assert message.content[0].type == "text" and message.content[0].text
    with claude.messages.stream(**kw, extra_body={"temperature": 0}) as stream:
        text = "".join(stream.text_stream)
        assert stream.get_final_message().content[0].text == text != ""
