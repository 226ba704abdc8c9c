"""--reasoning-parser over HTTP on a model that thinks (tests/thinking_model.py writes
``<think>ok</think>Hi``), with --num-scheduler-steps 8: ``reasoning_content`` beside the content,
streamed as ``delta.reasoning_content``; ``enable_thinking: false`` honoured; reasoning tokens in
usage; output constraints and forced tool calls start after the thinking (the grammar is free
until ``</think>``); DeepSeek-R1's template that opens the thinking in the prompt; a model
without the markers refused at start."""

import json
import subprocess
import sys

import openai
import pytest
from live_server import start_server
from thinking_model import write_thinking_model

pytestmark = pytest.mark.slow
USER = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}


def _server(tmp_path_factory, parser: str, opens_in_prompt: bool):
    model = write_thinking_model(tmp_path_factory.mktemp("thinking") / "model", opens_in_prompt)
    args = ["--model", str(model), "--model_name", "t", "--max-model-len", "256", "--num-scheduler-steps", "8"]
    args += ["--reasoning-parser", parser, "--tool-call-parser", "hermes", "--enable-auto-tool-choice"]
    return start_server(args, tmp_path_factory.mktemp("logs") / "server.log")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    server = _server(tmp_path_factory, "qwen3", opens_in_prompt=False)
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    server.stop()


def _chat(client, **kw):
    return client.chat.completions.create(**({"model": "t", "messages": USER, "max_tokens": 24, "temperature": 0} | kw))


def test_reasoning_content_beside_the_answer(client):
    out = _chat(client)
    message = out.choices[0].message
    assert (message.reasoning_content, message.content) == ("ok", "Hi")
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens_details.reasoning_tokens == 4  # <think> o k </think>
    assert out.usage.completion_tokens == 7


def test_streamed_deltas_reassemble(client):
    chunks = list(_chat(client, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert (reasoning, "".join(d.content or "" for d in deltas)) == ("ok", "Hi")
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 4


def test_enable_thinking_false_is_honoured(client):
    out = _chat(client, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert (out.choices[0].message.reasoning_content, out.choices[0].message.content) == (None, "Hi")
    assert out.usage.completion_tokens_details.reasoning_tokens == 0


def test_constraints_start_after_the_thinking(client):
    out = _chat(client, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert (out.choices[0].message.reasoning_content, out.choices[0].message.content) == ("ok", "no")
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}
    out = _chat(client, response_format=fmt)
    assert out.choices[0].message.reasoning_content == "ok"
    assert json.loads(out.choices[0].message.content)["answer"] in ("yes", "no")
    closed = _chat(client, response_format=fmt, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert closed.choices[0].message.reasoning_content is None  # the prompt closed the thinking: constrained at once
    assert json.loads(closed.choices[0].message.content)["answer"] in ("yes", "no")


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls_follow_the_thinking(client, stream):
    tools = [{"type": "function", "function": {"name": "reply", "parameters": SCHEMA}}]
    for choice in ({"type": "function", "function": {"name": "reply"}}, "required"):
        kw = dict(tools=tools, tool_choice=choice, parallel_tool_calls=False, max_tokens=64)
        if not stream:
            message = _chat(client, **kw).choices[0].message
            reasoning, calls = message.reasoning_content, message.tool_calls
            assert message.content is None
            got = [(c.function.name, json.loads(c.function.arguments)) for c in calls]
        else:
            deltas = [c.choices[0].delta for c in _chat(client, stream=True, **kw) if c.choices]
            reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
            names = [t.function.name for d in deltas for t in d.tool_calls or [] if t.function.name]
            args = "".join(t.function.arguments or "" for d in deltas for t in d.tool_calls or [])
            got = [(n, json.loads(args)) for n in names]
        assert reasoning == "ok"
        assert [name for name, _ in got] == ["reply"] and got[0][1]["answer"] in ("yes", "no")


def test_deepseek_r1_template_opens_the_thinking_in_the_prompt(tmp_path_factory):
    server = _server(tmp_path_factory, "deepseek_r1", opens_in_prompt=True)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        message = _chat(client).choices[0].message
        assert (message.reasoning_content, message.content) == ("ok", "Hi")
        out = _chat(client, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
        assert (out.choices[0].message.reasoning_content, out.choices[0].message.content) == ("ok", "no")
    finally:
        server.stop()


def test_a_model_without_the_markers_is_refused_at_start(tiny_llama):
    command = [sys.executable, "-m", "stepserve", "serve", "--model", str(tiny_llama), "--reasoning-parser", "qwen3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "--reasoning-parser qwen3 needs <think> as one token" in done.stderr
