"""Reasoning through the Responses and Anthropic Messages APIs, on the model that thinks
(tests/thinking_model.py writes ``<think>ok</think>Hi``) with --reasoning-parser qwen3: a
``reasoning`` item and reasoning tokens in usage (Responses, whole and streamed through the
openai SDK's helper), ``thinking`` blocks (Anthropic, whole and through ``messages.stream``),
``thinking: disabled`` honoured, and structured output that starts after the thinking."""

import json

import anthropic
import openai
import pytest
from live_server import start_server
from thinking_model import write_thinking_model

pytestmark = pytest.mark.slow
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = write_thinking_model(tmp_path_factory.mktemp("thinking") / "model")
    args = ["--model", str(model), "--model_name", "t", "--max-model-len", "4096", "--reasoning-parser", "qwen3"]
    live = start_server(args, tmp_path_factory.mktemp("logs") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def _reasoning_texts(response) -> list[str]:
    return [part.text for item in response.output if item.type == "reasoning" for part in item.content or []]


def test_responses_carry_a_reasoning_item(oai):
    response = oai.responses.create(model="t", input="hi", max_output_tokens=24, temperature=0)
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert _reasoning_texts(response) == ["ok"] and response.output_text == "Hi"
    assert response.usage.output_tokens_details.reasoning_tokens == 4
    with oai.responses.stream(model="t", input="hi", max_output_tokens=24, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.reasoning_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "ok"
    assert _reasoning_texts(final) == ["ok"] and final.output_text == "Hi"


def test_responses_structured_output_follows_the_thinking(oai):
    fmt = {"format": {"type": "json_schema", "name": "a", "schema": SCHEMA, "strict": True}}
    response = oai.responses.create(model="t", input="hi", max_output_tokens=40, temperature=0, text=fmt)
    assert _reasoning_texts(response) == ["ok"]
    assert json.loads(response.output_text)["answer"] in ("yes", "no")


def test_messages_carry_thinking_blocks(claude):
    thinking = {"type": "enabled", "budget_tokens": 1024}
    kw = dict(model="t", max_tokens=2048, messages=[{"role": "user", "content": "hi"}], extra_body={"temperature": 0})
    message = claude.messages.create(thinking=thinking, **kw)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in message.content] == [
        ("thinking", "ok"),
        ("text", "Hi"),
    ]
    assert message.stop_reason == "end_turn"
    with claude.messages.stream(thinking=thinking, **kw) as stream:
        final = stream.get_final_message()
    assert [b.model_dump(exclude_none=True) for b in final.content] == [
        b.model_dump(exclude_none=True) for b in message.content
    ]
    plain = claude.messages.create(thinking={"type": "disabled"}, **kw)
    assert [(b.type, b.text) for b in plain.content] == [("text", "Hi")]
