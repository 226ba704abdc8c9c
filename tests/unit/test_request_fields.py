"""Nothing a client sends is silently dropped (issue 16), without a server: unknown fields are a
400 naming them (or ignored and logged once with --allow-unknown-fields), what OpenAI's and
KServe's own clients send is known, Hugging Face spellings in KServe parameters are mapped, v2
tensors are checked, and the model's generation_config.json fills only what a request leaves out."""

import json
import logging

import httpx
import openai as openai_client
import pytest

from stepserve.config import ConfigError
from stepserve.errors import InvalidRequestError
from stepserve.checkpoint.generation_config import SamplingDefaults, load_sampling_defaults, log_sampling_defaults
from stepserve.server import kserve
from stepserve.server import plan
from stepserve.server.plan import plan_chat, plan_completion
from stepserve.server.config import ServerConfig
from stepserve.server.context import ServingContext
from stepserve.server.fields import UnknownFieldPolicy, hf_parameters
from stepserve.server.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    KServeV1Request,
    KServeV2Request,
    validate,
)

MAX_MODEL_LEN = 100
QWEN3 = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0, "repetition_penalty": 1.05, "max_new_tokens": 7}


def _prompts(ctx, req):
    return [(p.text, p.input) for p in plan_completion(ctx, req).prompts]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny_models import save_byte_tokenizer
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tok")
    save_byte_tokenizer(directory)
    return AutoTokenizer.from_pretrained(str(directory))


def context(tokenizer, defaults=SamplingDefaults(), allow=False, **server) -> ServingContext:
    # Validation and resolution never touch the engine.
    return ServingContext(
        None,
        tokenizer,
        "m",
        MAX_MODEL_LEN,
        len(tokenizer),
        ServerConfig(**server),
        sampling_defaults=defaults,
        unknown=UnknownFieldPolicy(allow),
    )


# -- unknown fields -----------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
V2 = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}


@pytest.mark.parametrize(
    "model,body,name",
    [
        (CompletionRequest, {"prompt": "x", "do_sample": False}, "do_sample"),
        (ChatCompletionRequest, CHAT | {"max_new_tokens": 5}, "max_new_tokens"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi", "weight": 1}]}, "messages[0].weight"),
        (
            ChatCompletionRequest,
            CHAT | {"stream": True, "stream_options": {"include_usage": True, "continuous": 1}},
            "stream_options.continuous",
        ),
        (
            ChatCompletionRequest,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "lang": "en"}]}]},
            "messages[0].content[0].lang",
        ),
        (KServeV1Request, {"instances": ["x"], "signature_name": "s"}, "signature_name"),
        (KServeV2Request, V2 | {"priority": 1}, "priority"),
        (KServeV2Request, {"inputs": [V2["inputs"][0] | {"extra": 1}]}, "inputs[0].extra"),
        (
            KServeV2Request,
            V2 | {"outputs": [{"name": "text_output", "classification": 2}]},
            "outputs[0].classification",
        ),
    ],
)
def test_an_unknown_field_is_a_400_naming_it(model, body, name):
    with pytest.raises(InvalidRequestError, match="Unrecognized request argument") as err:
        validate(model, body)
    assert err.value.param == name and name in err.value.message and "--allow-unknown-fields" in err.value.message
    assert validate(model, body, UnknownFieldPolicy(allow=True))  # vLLM's behaviour when allowed


def test_allowed_unknown_fields_are_logged_once_per_name(caplog):
    policy = UnknownFieldPolicy(allow=True)
    body = {"messages": [{"role": "user", "content": "a", "x": 1}, {"role": "user", "content": "b", "x": 2}], "foo": 1}
    with caplog.at_level(logging.WARNING, logger="stepserve.server"):
        for _ in range(3):
            validate(ChatCompletionRequest, body, policy)
    logged = [r.getMessage() for r in caplog.records if "unknown request field" in r.getMessage()]
    assert sorted(logged) == sorted(
        f"ignoring the unknown request field {n!r} (--allow-unknown-fields; logged once)"
        for n in ("foo", "messages[].x")
    )


def _sent_by_openai_client(call) -> dict:
    """The JSON body the official openai client sends for ``call(client)``."""
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(500, json={"error": {"message": "captured"}})

    client = openai_client.OpenAI(
        api_key="x",
        base_url="http://test/v1",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )
    with pytest.raises(openai_client.APIError):
        call(client)
    return bodies[0]


ADVISORY = dict(user="u", metadata={"k": "v"}, store=False, safety_identifier="s", prompt_cache_key="c")


def test_what_the_openai_client_sends_is_known():
    chat = _sent_by_openai_client(
        lambda c: c.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            stream=True,
            stream_options={"include_usage": True},
            max_completion_tokens=3,
            logprobs=True,
            top_logprobs=2,
            seed=1,
            extra_body={"top_k": 2, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True},
            **ADVISORY,
        )
    )
    assert {"stream", "metadata", "store", "top_k"} <= set(chat)
    validate(ChatCompletionRequest, chat)
    cmpl = _sent_by_openai_client(
        lambda c: c.completions.create(model="m", prompt=["a", "b"], echo=True, logprobs=2, n=2, user="u")
    )
    validate(CompletionRequest, cmpl)


def test_what_kserves_client_sends_is_known(tokenizer):
    # KServe's InferRequest.to_rest: id and model_name always, requested outputs with their
    # binary_data parameter, request parameters such as binary_data_output.
    body = {
        "id": "5a1d",
        "model_name": "m",
        "inputs": [
            {
                "name": "text_input",
                "shape": [2],
                "datatype": "BYTES",
                "data": ["a", "b"],
                "parameters": {"content_type": "str"},
            }
        ],
        "outputs": [{"name": "text_output", "parameters": {"binary_data": False}}],
        "parameters": {"binary_data_output": False, "max_tokens": 2},
    }
    creq, wanted = kserve.v2_completion(context(tokenizer), validate(KServeV2Request, body))
    assert creq.prompt == ["a", "b"] and creq.max_tokens == 2 and wanted == ["text_output"]
    body["outputs"].append({"name": "logprobs"})
    creq, wanted = kserve.v2_completion(context(tokenizer), validate(KServeV2Request, body))
    assert creq.logprobs == 0 and wanted == ["text_output", "logprobs"]


# -- KServe parameters and tensors --------------------------------------------------------


def test_hugging_face_spellings_are_mapped():
    mapped = hf_parameters(
        {
            "max_new_tokens": 5,
            "do_sample": False,
            "stop_sequences": ["\n"],
            "return_full_text": True,
            "temperature": 0.9,
        }
    )
    assert mapped == {"max_tokens": 5, "temperature": 0.0, "stop": ["\n"], "echo": True}
    assert hf_parameters({"do_sample": True, "top_p": 0.5}) == {"top_p": 0.5}
    with pytest.raises(InvalidRequestError) as err:
        hf_parameters({"max_new_tokens": 5, "max_tokens": 6})
    assert err.value.param == "parameters.max_new_tokens"
    with pytest.raises(InvalidRequestError, match="true or false"):
        hf_parameters({"do_sample": "no"})


@pytest.mark.parametrize(
    "parameters,param",
    [
        ({"watermark": True}, "parameters.watermark"),
        ({"prompt": "x"}, "parameters.prompt"),
        ({"stream": True}, "parameters.stream"),
        ({"stream_options": {"include_usage": True}}, "parameters.stream_options"),
    ],
)
def test_kserve_parameters_that_cannot_be_honoured_are_refused(tokenizer, parameters, param):
    with pytest.raises(InvalidRequestError) as err:
        kserve.completion_request(context(tokenizer), ["hi"], parameters)
    assert err.value.param == param


def test_kserve_parameters_become_a_completion_request(tokenizer):
    req = kserve.completion_request(
        context(tokenizer), ["hi"], {"max_new_tokens": 3, "do_sample": False, "logprobs": 2, "stream": False}
    )
    assert (req.max_tokens, req.temperature, req.logprobs, req.prompt) == (3, 0.0, 2, ["hi"])


def v2(**tensor):
    return KServeV2Request.model_validate(
        {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]} | tensor]}
    )


@pytest.mark.parametrize(
    "req,match",
    [
        (v2(shape=[2]), r"shape \[2\] but 1"),
        (v2(shape=[2, 2], data=[["a", "b"], ["c"]]), r"shape \[2, 2\] but 3"),
        (v2(name="prompt"), "takes one input"),
        (v2(datatype="INT32", data=[1]), "BYTES"),
        (v2(shape=[0], data=[]), "non-empty"),
        (v2(data=[3]), "strings"),
        (v2(parameters={"binary_data_size": 4}), "binary"),
        (KServeV2Request.model_validate({"inputs": [v2().inputs[0].model_dump()] * 2}), "exactly one"),
    ],
)
def test_bad_v2_tensors_are_refused(tokenizer, req, match):
    with pytest.raises(InvalidRequestError, match=match):
        kserve._text_input(context(tokenizer), req)


def test_v2_batches_and_requested_outputs(tokenizer):
    assert kserve._text_input(context(tokenizer), v2(shape=[1, 3], data=[["a", "b", "c"]])) == ["a", "b", "c"]
    req = KServeV2Request.model_validate({**V2, "outputs": [{"name": "logprobs"}, {"name": "scores"}]})
    with pytest.raises(InvalidRequestError, match="'scores' cannot be produced"):
        kserve._wanted_outputs(context(tokenizer), req, {})
    assert kserve._wanted_outputs(context(tokenizer), v2(), {"logprobs": 1}) == ["text_output", "logprobs"]


# -- chat text parts ----------------------------------------------------------------------


def test_text_parts_are_joined_with_a_newline_as_vllm_does():
    message = ChatMessage.model_validate(
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    )
    assert plan._message_dict(0, message)["content"] == "a\nb"


# -- the model's sampling defaults --------------------------------------------------------


def write_generation_config(directory, **values):
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "do_sample": True} | values))
    return directory


def test_generation_config_modes(tmp_path, caplog):
    (tmp_path / "model").mkdir()
    (tmp_path / "other").mkdir()
    model = write_generation_config(tmp_path / "model", **QWEN3)
    other = write_generation_config(tmp_path / "other", temperature=0.3)
    with caplog.at_level(logging.INFO, logger="stepserve"):
        defaults = load_sampling_defaults("auto", model)
        log_sampling_defaults(defaults)
    assert defaults.as_dict() == QWEN3
    assert "using the model's sampling defaults: temperature=0.6, top_p=0.95, top_k=20" in caplog.text
    assert load_sampling_defaults("vllm", model) == SamplingDefaults()
    assert load_sampling_defaults(str(other), model).as_dict() == {"temperature": 0.3}
    assert load_sampling_defaults("auto", tmp_path) == SamplingDefaults()  # no file: no defaults
    with pytest.raises(ConfigError, match="no generation_config.json"):
        load_sampling_defaults(str(tmp_path), model)
    write_generation_config(other, top_p=1.5)
    with pytest.raises(ConfigError, match="top_p") as err:
        load_sampling_defaults(str(other), model)
    assert "generation_config.json" in str(err.value) and "--generation-config vllm" in str(err.value)


def completion(tokenizer, defaults, server=None, **body):
    req = validate(CompletionRequest, {"prompt": "hello"} | body)
    return _prompts(context(tokenizer, defaults, **(server or {})), req)[0][1].params


def chat(tokenizer, defaults, **body):
    req = validate(ChatCompletionRequest, CHAT | body)
    return plan_chat(context(tokenizer, defaults), req).inputs[0].params


def test_defaults_fill_only_what_a_request_leaves_out(tokenizer):
    defaults = SamplingDefaults(**QWEN3)
    for params in (
        completion(tokenizer, defaults),
        chat(tokenizer, defaults),
        chat(tokenizer, defaults, temperature=None),
    ):
        assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (
            0.6,
            0.95,
            20,
            0.0,
            1.05,
        )
    given = chat(tokenizer, defaults, temperature=0, top_p=1, top_k=0, min_p=0.2, repetition_penalty=1.0)
    assert (given.temperature, given.top_p, given.top_k, given.min_p, given.repetition_penalty) == (
        0.0,
        1.0,
        0,
        0.2,
        1.0,
    )
    plain = chat(tokenizer, SamplingDefaults())
    assert (plain.temperature, plain.top_p, plain.top_k, plain.min_p, plain.repetition_penalty) == (
        1.0,
        1.0,
        0,
        0.0,
        1.0,
    )


def test_max_new_tokens_is_one_more_cap_on_an_omitted_max_tokens(tokenizer):
    defaults = SamplingDefaults(max_new_tokens=7)
    assert chat(tokenizer, defaults).max_tokens == 7  # instead of the remaining context
    assert completion(tokenizer, defaults).max_tokens == 7  # instead of 16
    assert completion(tokenizer, SamplingDefaults(max_new_tokens=40)).max_tokens == 16
    assert completion(tokenizer, defaults, {"default_max_tokens": 5}).max_tokens == 5
    assert chat(tokenizer, defaults, max_tokens=30).max_tokens == 30  # a given value is the request's
    assert chat(tokenizer, defaults, max_tokens=None).is_resolved


def test_the_flags_reach_the_configs():
    from stepserve.cli import build_parser
    from stepserve.config import engine_config_from_args
    from stepserve.cli.serve import server_config_from_args

    args = build_parser().parse_args(["serve", "--allow-unknown-fields", "--generation-config", "vllm"])
    assert server_config_from_args(args).allow_unknown_fields is True
    assert engine_config_from_args(args).model.generation_config == "vllm"
    default = build_parser().parse_args(["serve"])
    assert server_config_from_args(default).allow_unknown_fields is False
    assert engine_config_from_args(default).model.generation_config == "auto"


def test_an_assistant_message_replayed_from_the_openai_client_is_accepted():
    from openai.types.chat import ChatCompletionMessage

    replayed = ChatCompletionMessage(role="assistant", content="4").model_dump()
    assert {"refusal", "annotations", "audio", "function_call"} <= set(replayed)
    validate(ChatCompletionRequest, {"messages": [CHAT["messages"][0], replayed]})
    with pytest.raises(InvalidRequestError) as err:  # a refusal text would be lost: refused
        validate(ChatCompletionRequest, {"messages": [CHAT["messages"][0], replayed | {"refusal": "no"}]})
    assert err.value.param == "messages" and "refusal" in err.value.message
