"""Bad requests are a 400 (or 404) in the OpenAI error shape naming the parameter, before the
engine sees them, and never disturb the next request (docs/architecture.md, invariants 1 and 2)."""

import httpx
import pytest
from live_server import start_server

MODEL = "tiny"
MAX_MODEL_LEN = 64
LIMIT = 32  # --max-tokens-limit
C, H = "/v1/completions", "/v1/chat/completions"
V1, V2 = f"/v1/models/{MODEL}:predict", f"/v2/models/{MODEL}/infer"
USER = [{"role": "user", "content": "hi"}]


def cmpl(**kw):
    return {"model": MODEL, "prompt": "hello", "max_tokens": 2} | kw


def chat(**kw):
    return {"model": MODEL, "messages": USER, "max_tokens": 2} | kw


def v2(tensor=None, **params):
    tensor = tensor or {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]}
    return {"inputs": [tensor], "parameters": {"max_tokens": 2} | params}


BAD = [  # (id, route, body (dict or raw text), status, the parameter the error names)
    ("max_tokens=0", C, cmpl(max_tokens=0), 400, "max_tokens"),
    ("max_tokens=-1", C, cmpl(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens=ten", C, cmpl(max_tokens="ten"), 400, "max_tokens"),
    ("max_tokens=1e9", C, '{"prompt": "hello", "max_tokens": 1e9}', 400, "max_tokens"),
    ("max_tokens=2.5", C, cmpl(max_tokens=2.5), 400, "max_tokens"),
    ("max_tokens past context", C, cmpl(max_tokens=60), 400, "max_tokens"),
    ("max_tokens over limit", C, cmpl(max_tokens=LIMIT + 1), 400, "max_tokens"),
    ("empty prompt", C, cmpl(prompt=""), 400, "prompt"),
    ("empty prompt list", C, cmpl(prompt=[]), 400, "prompt"),
    ("empty token list", C, cmpl(prompt=[[]]), 400, "prompt"),
    ("prompt missing", C, {"model": MODEL, "max_tokens": 2}, 400, "prompt"),
    ("prompt number", C, cmpl(prompt=123), 400, "prompt"),
    ("prompt mixed list", C, cmpl(prompt=[1, "a"]), 400, "prompt"),
    ("token id outside vocab", C, cmpl(prompt=[1, 999999]), 400, "prompt"),
    ("prompt leaves no room", C, cmpl(prompt="x" * MAX_MODEL_LEN), 400, "prompt"),
    ("temperature=-1", C, cmpl(temperature=-1), 400, "temperature"),
    ("temperature=hot", C, cmpl(temperature="hot"), 400, "temperature"),
    ("top_p=0", C, cmpl(top_p=0), 400, "top_p"),
    ("top_p=2", C, cmpl(top_p=2), 400, "top_p"),
    ("top_k=-5", C, cmpl(top_k=-5), 400, "top_k"),
    ("min_p=1.5", C, cmpl(min_p=1.5), 400, "min_p"),
    ("presence_penalty=3", C, cmpl(presence_penalty=3), 400, "presence_penalty"),
    ("frequency_penalty=-3", C, cmpl(frequency_penalty=-3), 400, "frequency_penalty"),
    ("repetition_penalty=0", C, cmpl(repetition_penalty=0), 400, "repetition_penalty"),
    ("n=0", C, cmpl(n=0), 400, "n"),
    ("n=two", C, cmpl(n="two"), 400, "n"),
    ("logprobs=21", C, cmpl(logprobs=21), 400, "logprobs"),
    ("logprobs=-1", C, cmpl(logprobs=-1), 400, "logprobs"),
    ("stop empty string", C, cmpl(stop=[""]), 400, "stop"),
    ("stop number", C, cmpl(stop=5), 400, "stop"),
    ("logit_bias key", C, cmpl(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("logit_bias value", C, cmpl(logit_bias={"5": 500}), 400, "logit_bias"),
    ("logit_bias token outside vocab", C, cmpl(logit_bias={"999999": 1}), 400, "logit_bias"),
    ("seed=x", C, cmpl(seed="x"), 400, "seed"),
    ("seed too large", C, cmpl(seed=2**70), 400, "seed"),
    ("stream=yes", C, cmpl(stream="yes"), 400, "stream"),
    ("stream_options without stream", C, cmpl(stream_options={"include_usage": True}), 400, "stream_options"),
    ("min_tokens > max_tokens", C, cmpl(min_tokens=5), 400, "min_tokens"),
    ("stop_token_ids=-1", C, cmpl(stop_token_ids=[-1]), 400, "stop_token_ids"),
    ("echo=yes", C, cmpl(echo="yes"), 400, "echo"),
    ("suffix", C, cmpl(suffix="end"), 400, "suffix"),
    ("malformed JSON", C, '{"prompt": "hello",', 400, "body"),
    ("JSON not an object", C, "[1, 2]", 400, "body"),
    ("unknown model", C, cmpl(model="no-such-model"), 404, "model"),
    ("chat empty messages", H, chat(messages=[]), 400, "messages"),
    ("chat messages missing", H, {"model": MODEL}, 400, "messages"),
    ("chat role bogus", H, chat(messages=[{"role": "bogus", "content": "x"}]), 400, "messages"),
    ("chat messages a string", H, chat(messages="hi"), 400, "messages"),
    ("chat content a number", H, chat(messages=[{"role": "user", "content": 5}]), 400, "messages"),
    (
        "chat content part type",
        H,
        chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        400,
        "messages",
    ),
    ("chat max_tokens=0", H, chat(max_tokens=0), 400, "max_tokens"),
    ("chat max_completion_tokens=0", H, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("chat max_completion_tokens over limit", H, chat(max_completion_tokens=LIMIT + 1), 400, "max_completion_tokens"),
    ("chat top_logprobs=21", H, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("chat top_logprobs without logprobs", H, chat(top_logprobs=2), 400, "top_logprobs"),
    ("chat logprobs not a bool", H, chat(logprobs=3), 400, "logprobs"),
    ("chat temperature=200", H, chat(temperature=200), 400, "temperature"),
    (
        "chat prompt leaves no room",
        H,
        chat(messages=[{"role": "user", "content": "y" * MAX_MODEL_LEN}]),
        400,
        "messages",
    ),
    ("chat unknown model", H, chat(model="no-such-model"), 404, "model"),
    ("chat malformed JSON", H, '{"messages": [', 400, "body"),
    ("kserve v1 no instances", V1, {"instances": []}, 400, "instances"),
    ("kserve v1 max_tokens=0", V1, {"instances": ["hi"], "parameters": {"max_tokens": 0}}, 400, "max_tokens"),
    ("kserve v1 unknown model", "/v1/models/nope:predict", {"instances": ["hi"]}, 404, "model"),
    (
        "kserve v2 no text_input",
        V2,
        v2({"name": "other", "shape": [1], "datatype": "BYTES", "data": ["x"]}),
        400,
        "inputs",
    ),
    (
        "kserve v2 datatype",
        V2,
        v2({"name": "text_input", "shape": [1], "datatype": "FP32", "data": [1.0]}),
        400,
        "inputs",
    ),
    ("kserve v2 top_p=2", V2, v2(top_p=2), 400, "top_p"),
]


@pytest.fixture(scope="module")
def http(tiny_llama, tmp_path_factory):
    args = [
        "--model",
        str(tiny_llama),
        "--model_name",
        MODEL,
        "--max_model_len",
        str(MAX_MODEL_LEN),
        "--num-blocks",
        "64",
        "--max-tokens-limit",
        str(LIMIT),
    ]
    server = start_server(args, tmp_path_factory.mktemp("logs") / "server.log")
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client
    server.stop()


def test_the_table_is_large_enough():
    assert len(BAD) >= 40


@pytest.mark.parametrize("route,body,status,param", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_request(http, route, body, status, param):
    if isinstance(body, str):
        response = http.post(route, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(route, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    ok = http.post(C, json=cmpl(max_tokens=2, ignore_eos=True))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_prompt_that_fits_exactly_succeeds(http):
    prompt = "z" * (MAX_MODEL_LEN - 4)
    response = http.post(C, json=cmpl(prompt=prompt, max_tokens=4, ignore_eos=True))
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4


def test_unknown_route_and_wrong_method_keep_the_error_shape(http):
    assert http.get("/v1/nonexistent").json()["error"]["code"] == 404
    assert http.get(C).status_code == 405
