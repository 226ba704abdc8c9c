"""A server with ``--engine-in-process`` (the core in a thread, no core process): logprobs over
HTTP against transformers' log_softmax, seeded choices equal to the offline API's, and KServe's
default ``max_tokens`` and outputs against ``/v1/completions`` (tiny random Llama, float32)."""

import httpx
import pytest
import torch
import transformers
from live_server import core_pid, start_server
from references import hf_logprobs

from stepserve import LLM, SamplingParams
from stepserve.checkpoint.tokenizer import apply_chat_template

MODEL = "tiny"
TOL = 1e-4


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    args = [
        "--model",
        str(tiny_llama),
        "--model_name",
        MODEL,
        "--max-model-len",
        "256",
        "--num-blocks",
        "256",
        "--engine-in-process",
    ]
    live = start_server(args, tmp_path_factory.mktemp("logs") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def offline(tiny_llama):
    return LLM(model=str(tiny_llama), num_blocks=256, block_size=16, max_model_len=256)


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def post(http, path, body):
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def check_position(ref_row: torch.Tensor, token_id: int, chosen: float, top: list[tuple[str, float]], decode) -> None:
    """One generated token: its logprob, and the (text, logprob) alternatives, against the
    reference row. Alternatives are named by text: each must match an id of the 5 most likely (or
    the chosen token, which completions add) that decodes to it, and all 5 must be there."""
    assert abs(chosen - ref_row[token_id].item()) < TOL
    top_ids = ref_row.topk(5).indices.tolist()
    for text, value in top:
        candidates = [i for i in top_ids if decode(i) == text] + ([token_id] if decode(token_id) == text else [])
        assert any(abs(value - ref_row[i].item()) < TOL for i in candidates), (text, value)
    assert {decode(i) for i in top_ids} <= {text for text, _ in top}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_completion_logprobs_equal_transformers(temperature, http, offline, hf):
    prompt = "Hello there"
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 10,
        "temperature": temperature,
        "seed": 21,
        "logprobs": 5,
        "ignore_eos": True,
    }
    choice = post(http, "/v1/completions", body)["choices"][0]
    ids = offline.tokenizer.encode(prompt)
    mine = offline.generate([ids], SamplingParams(temperature=temperature, seed=21, max_tokens=10, ignore_eos=True))[
        0
    ].outputs[0]
    decode = lambda i: offline.tokenizer.decode([i])  # noqa: E731
    lp = choice["logprobs"]
    assert lp["tokens"] == [decode(t) for t in mine.token_ids]  # the same tokens as offline, same seed
    ref = hf_logprobs(hf, ids, mine.token_ids)
    for t, token_id in enumerate(mine.token_ids):
        check_position(ref[t], token_id, lp["token_logprobs"][t], list(lp["top_logprobs"][t].items()), decode)


def test_chat_logprobs_equal_transformers(http, offline, hf):
    messages = [{"role": "user", "content": "Hi, who are you?"}]
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 10,
        "temperature": 0.8,
        "seed": 4,
        "logprobs": True,
        "top_logprobs": 5,
        "ignore_eos": True,
    }
    out = post(http, "/v1/chat/completions", body)
    ids = apply_chat_template(offline.tokenizer, messages, True)
    assert out["usage"]["prompt_tokens"] == len(ids)
    mine = offline.generate([ids], SamplingParams(temperature=0.8, seed=4, max_tokens=10, ignore_eos=True))[0].outputs[
        0
    ]
    decode = lambda i: offline.tokenizer.decode([i])  # noqa: E731
    content = out["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == [decode(t) for t in mine.token_ids]
    ref = hf_logprobs(hf, ids, mine.token_ids)
    for t, (entry, token_id) in enumerate(zip(content, mine.token_ids)):
        assert len(entry["top_logprobs"]) == 5
        check_position(
            ref[t], token_id, entry["logprob"], [(e["token"], e["logprob"]) for e in entry["top_logprobs"]], decode
        )


def test_seeded_n_choices_equal_the_offline_api(http, offline):
    body = {
        "model": MODEL,
        "prompt": "abc",
        "max_tokens": 8,
        "n": 3,
        "temperature": 1.2,
        "seed": 900,
        "ignore_eos": True,
    }
    texts = [c["text"] for c in sorted(post(http, "/v1/completions", body)["choices"], key=lambda c: c["index"])]
    mine = offline.generate("abc", SamplingParams(n=3, temperature=1.2, seed=900, max_tokens=8, ignore_eos=True))[0]
    assert texts == [c.text for c in mine.outputs]


def test_kserve_default_max_tokens_and_v2_equal_v1_completions(http):
    greedy = {"temperature": 0, "ignore_eos": True}
    prompts = ["hello", "The quick brown fox"]
    completions = post(http, "/v1/completions", {"model": MODEL, "prompt": prompts, **greedy})
    assert all(c["finish_reason"] == "length" for c in completions["choices"])
    assert completions["usage"]["completion_tokens"] == 16 * len(prompts)
    texts = [c["text"] for c in sorted(completions["choices"], key=lambda c: c["index"])]
    v1 = post(http, f"/v1/models/{MODEL}:predict", {"instances": prompts, "parameters": greedy})
    assert v1["predictions"] == texts  # max_tokens left out: 16, as on /v1/completions
    v2_body = {
        "inputs": [{"name": "text_input", "shape": [2], "datatype": "BYTES", "data": prompts}],
        "parameters": greedy,
    }
    assert post(http, f"/v2/models/{MODEL}/infer", v2_body)["outputs"][0]["data"] == texts


def test_no_core_process(server):
    with pytest.raises(RuntimeError, match="no engine core process"):
        core_pid(server)
