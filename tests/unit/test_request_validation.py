"""The server's front half without a server: body parsing, max_tokens resolution per route
(docs/architecture.md, invariant 1), parameter naming, and the one exception -> HTTP mapping."""

import pytest
from starlette.exceptions import HTTPException

from stepserve.errors import (
    EngineDeadError,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
    RequestAbortedError,
)
from stepserve.server.plan import plan_chat, plan_completion
from stepserve.server.app import http_error
from stepserve.server.config import ServerConfig
from stepserve.server.context import ServingContext
from stepserve.server.fields import UnknownFieldPolicy
from stepserve.server.schemas import ChatCompletionRequest, CompletionRequest, parse_body, validate

MAX_MODEL_LEN = 100


def _prompts(ctx, req):
    return [(p.text, p.input) for p in plan_completion(ctx, req).prompts]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny_models import save_byte_tokenizer
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tok")
    save_byte_tokenizer(directory)
    return AutoTokenizer.from_pretrained(str(directory))


def context(tokenizer, **server) -> ServingContext:
    # The engine is not needed to validate and resolve; these functions never touch it.
    return ServingContext(None, tokenizer, "m", MAX_MODEL_LEN, len(tokenizer), ServerConfig(**server))


def completion(tokenizer, server=None, **body):
    req = validate(CompletionRequest, {"prompt": "hello"} | body)
    return _prompts(context(tokenizer, **(server or {})), req)[0][1]


def chat(tokenizer, server=None, **body):
    req = validate(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]} | body)
    return plan_chat(context(tokenizer, **(server or {})), req).inputs[0]


def test_completions_default_is_16_capped_by_the_server(tokenizer):
    assert completion(tokenizer).params.max_tokens == 16
    assert completion(tokenizer, {"default_max_tokens": 8}).params.max_tokens == 8
    assert completion(tokenizer, prompt="x" * 90).params.max_tokens == 10  # the room left


def test_chat_default_is_the_remaining_context_capped_by_the_server(tokenizer):
    prompt = chat(tokenizer)
    assert prompt.params.max_tokens == MAX_MODEL_LEN - len(prompt.token_ids)
    assert chat(tokenizer, {"default_max_tokens": 8}).params.max_tokens == 8


def test_everything_entering_the_engine_is_resolved(tokenizer):
    for prompt in (
        completion(tokenizer),
        chat(tokenizer),
        chat(tokenizer, max_tokens=None),
        completion(tokenizer, max_tokens=None),
    ):
        assert prompt.params.is_resolved and isinstance(prompt.params.max_tokens, int)


def test_max_completion_tokens_wins_and_is_the_name_in_errors(tokenizer):
    assert chat(tokenizer, max_tokens=9, max_completion_tokens=3).params.max_tokens == 3
    with pytest.raises(InvalidRequestError) as err:
        chat(tokenizer, {"max_tokens_limit": 5}, max_completion_tokens=6)
    assert err.value.param == "max_completion_tokens" and "5" in err.value.message


def test_limit_applies_to_given_values_only(tokenizer):
    assert completion(tokenizer, {"max_tokens_limit": 4}, max_tokens=4).params.max_tokens == 4
    with pytest.raises(InvalidRequestError, match="limit of 4"):
        completion(tokenizer, {"max_tokens_limit": 4}, max_tokens=5)


def test_a_chat_prompt_that_leaves_no_room_names_messages(tokenizer):
    with pytest.raises(InvalidRequestError) as err:
        chat(tokenizer, messages=[{"role": "user", "content": "y" * MAX_MODEL_LEN}])
    assert err.value.param == "messages" and str(MAX_MODEL_LEN) in err.value.message


def test_chat_top_logprobs_is_named_as_sent(tokenizer):
    assert chat(tokenizer, logprobs=True, top_logprobs=3).params.logprobs == 3
    assert chat(tokenizer, logprobs=True).params.logprobs == 0
    assert chat(tokenizer).params.logprobs is None
    with pytest.raises(InvalidRequestError) as err:
        chat(tokenizer, logprobs=True, top_logprobs=21)
    assert err.value.param == "top_logprobs"


@pytest.mark.parametrize(
    "raw,param",
    [
        (b'{"prompt": ', "body"),
        (b"\xff\xfe", "body"),
        (b"[]", "body"),
        (b'{"prompt": "x", "max_tokens": "ten"}', "max_tokens"),
        (b'{"prompt": "x", "n": 1.5}', "n"),
        (b'{"prompt": "x", "stream": 1}', "stream"),
        (b'{"prompt": {"a": 1}}', "prompt"),
        (b'{"max_tokens": 3}', "prompt"),
    ],
)
def test_parse_body_names_the_field(raw, param):
    with pytest.raises(InvalidRequestError) as err:
        parse_body(CompletionRequest, raw)
    assert err.value.param == param


def test_unknown_fields_are_refused_unless_allowed():
    with pytest.raises(InvalidRequestError, match="foo") as exc:
        parse_body(CompletionRequest, b'{"prompt": "x", "foo": 1}')
    assert exc.value.param == "foo"
    assert parse_body(CompletionRequest, b'{"prompt": "x", "foo": 1}', UnknownFieldPolicy(allow=True)).prompt == "x"


@pytest.mark.parametrize(
    "exc,status,kind",
    [
        (InvalidRequestError("bad", "n"), 400, "invalid_request_error"),
        (ModelNotFoundError("x", ["m"]), 404, "not_found_error"),
        (QueueFullError("busy"), 429, "queue_full"),
        (EngineDeadError("down"), 503, "engine_unavailable"),
        (RequestAbortedError("nan"), 500, "request_aborted"),
        (HTTPException(405, "Method Not Allowed"), 405, "invalid_request_error"),
        (RuntimeError("bug"), 500, "internal_error"),
    ],
)
def test_one_mapping_from_exceptions_to_http(exc, status, kind):
    error = http_error(exc)
    assert error.status == status and error.type == kind
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    if status in (429, 503):
        assert error.headers["Retry-After"]
