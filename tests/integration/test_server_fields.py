"""Faithful to the model and the client (issue 16), through a live server and the offline API: the
model's generation_config.json fills what a request leaves out, unknown fields are 400s naming
them on every route, KServe parameters take Hugging Face's spellings and honour logprobs and
echo, v2 batches give one output per text and bad tensors are refused."""

import json
import shutil

import httpx
import pytest
from live_server import start_server

MODEL = "tiny"
GENERATION_CONFIG = {
    "eos_token_id": [256],
    "bos_token_id": 257,
    "do_sample": True,
    "temperature": 0.7,
    "top_k": 1,
    "max_new_tokens": 3,
}
C, H = "/v1/completions", "/v1/chat/completions"
V1, V2 = f"/v1/models/{MODEL}:predict", f"/v2/models/{MODEL}/infer"
USER = [{"role": "user", "content": "hi"}]
FORCE = {"ignore_eos": True}  # a random model may sample EOS; counts below need every token


@pytest.fixture(scope="module")
def model_dir(tiny_llama, tmp_path_factory):
    """The tiny Llama with sampling defaults in its generation_config.json (top_k=1: greedy)."""
    directory = tmp_path_factory.mktemp("gencfg") / "llama"
    shutil.copytree(tiny_llama, directory)
    (directory / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return directory


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    args = ["--model", str(model_dir), "--model_name", MODEL, "--max-model-len", "128", "--num-blocks", "64"]
    live = start_server(args, tmp_path_factory.mktemp("logs") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def test_the_models_defaults_are_logged_once_and_shown(server, http):
    assert server.log().count("using the model's sampling defaults: temperature=0.7, top_k=1, max_new_tokens=3") == 1
    card = ok(http.get(f"/v1/models/{MODEL}"))
    assert card["generation_config"] == {"temperature": 0.7, "top_k": 1, "max_new_tokens": 3}


def test_defaults_apply_only_to_fields_left_out(http):
    left_out = ok(http.post(H, json={"messages": USER} | FORCE))["choices"][0]
    assert left_out["finish_reason"] == "length"
    greedy = ok(http.post(H, json={"messages": USER, "temperature": 0, "max_tokens": 3} | FORCE))["choices"][0]
    assert left_out["message"]["content"] == greedy["message"]["content"]  # top_k=1 and the 3-token cap
    given = ok(http.post(H, json={"messages": USER, "max_tokens": 5} | FORCE))
    assert given["usage"]["completion_tokens"] == 5  # a given max_tokens is not capped
    # top_k given (0: all tokens) at a high temperature: four samples of 3 tokens out of 320 differ
    sampled = ok(http.post(C, json={"prompt": "hi", "n": 4, "top_k": 0, "temperature": 5.0, "seed": 1} | FORCE))[
        "choices"
    ]
    assert len({c["text"] for c in sampled}) > 1
    defaults = ok(http.post(C, json={"prompt": "hi", "n": 4, "seed": 1} | FORCE))["choices"]
    assert len({c["text"] for c in defaults}) == 1  # top_k=1 from the model


@pytest.mark.parametrize(
    "route,body,param",
    [
        (C, {"prompt": "hi", "do_sample": False}, "do_sample"),
        (H, {"messages": USER, "max_new_tokens": 2}, "max_new_tokens"),
        (H, {"messages": [{"role": "user", "content": "hi", "lang": "en"}]}, "messages[0].lang"),
        (V1, {"instances": ["hi"], "parameters": {"watermark": True}}, "parameters.watermark"),
        (V1, {"instances": ["hi"], "parameters": {"stream": True}}, "parameters.stream"),
        (
            V2,
            {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]}], "priority": 1},
            "priority",
        ),
        (
            V2,
            {
                "inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]}],
                "parameters": {"details": True},
            },
            "parameters.details",
        ),
    ],
)
def test_unknown_fields_are_400s_naming_them(http, route, body, param):
    response = http.post(route, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and param in response.json()["error"]["message"]


def test_kserve_v1_hugging_face_spellings(http):
    hf = {"max_new_tokens": 4, "do_sample": False, "return_full_text": True} | FORCE
    body = ok(http.post(V1, json={"instances": ["hello", "there"], "parameters": hf}))
    ours = ok(
        http.post(
            V1,
            json={
                "instances": ["hello", "there"],
                "parameters": {"max_tokens": 4, "temperature": 0, "echo": True} | FORCE,
            },
        )
    )
    assert body == ours and body["predictions"][0].startswith("hello") and len(body["predictions"][0]) > len("hello")
    with_logprobs = ok(http.post(V1, json={"instances": ["hello"], "parameters": hf | {"logprobs": 1}}))
    assert len(with_logprobs["logprobs"][0]["token_logprobs"]) == len("hello") + 4  # the echoed prompt, then 4 tokens


def test_kserve_v2_batch_logprobs_and_bad_tensors(http):
    tensor = {"name": "text_input", "shape": [3], "datatype": "BYTES", "data": ["a", "b", "c"]}
    params = {"max_tokens": 2, "temperature": 0} | FORCE
    body = ok(
        http.post(
            V2,
            json={"inputs": [tensor], "parameters": params, "outputs": [{"name": "text_output"}, {"name": "logprobs"}]},
        )
    )
    text, logprobs = body["outputs"]
    assert text["shape"] == [3] and len(text["data"]) == 3 and logprobs["name"] == "logprobs"
    assert [len(json.loads(x)["token_logprobs"]) for x in logprobs["data"]] == [2, 2, 2]
    bad = [
        {"inputs": [tensor | {"shape": [2]}]},
        {"inputs": [tensor, tensor | {"name": "image"}]},
        {"inputs": [tensor], "outputs": [{"name": "embedding"}]},
    ]
    for case in bad:
        response = http.post(V2, json=case | {"parameters": params})
        assert response.status_code == 400 and response.json()["error"]["param"] in ("inputs", "outputs"), response.text


def test_offline_api_uses_the_models_defaults(model_dir):
    from stepserve.engine.llm import LLM
    from stepserve.sampling import SamplingParams

    llm = LLM(model=str(model_dir), num_blocks=32, max_model_len=64)
    assert (llm.get_default_sampling_params().temperature, llm.get_default_sampling_params().top_k) == (0.7, 1)
    capped = llm.generate("hi", SamplingParams(ignore_eos=True))[0].outputs[0]
    assert len(capped.token_ids) == 3  # max_new_tokens caps the remaining context
    plain = LLM(model=str(model_dir), num_blocks=32, max_model_len=64, generation_config="vllm")
    assert plain.get_default_sampling_params() == SamplingParams()
    assert len(plain.generate("hi", SamplingParams(ignore_eos=True, max_tokens=5))[0].outputs[0].token_ids) == 5
