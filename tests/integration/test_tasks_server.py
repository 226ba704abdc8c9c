"""An embedding server as deployed: the engine core in its own supervised process, the
official openai client, concurrent requests batched together, metrics, a core killed and back.
Expected vectors are the sentence-transformers formula (mean pooling, Normalize) computed
directly with transformers."""

import base64
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import transformers as tf
from live_server import core_pid, read_metric, start_server
from task_models import write_sentence_transformer

MODEL = "st-tiny"
TEXTS = ["hello world", "the capital of france is paris", "a cat sat on the mat", "dog", "new york is a big city"]


@pytest.fixture(scope="module")
def st_model(tmp_path_factory):
    return write_sentence_transformer(tmp_path_factory.mktemp("st") / "st-tiny", matryoshka_dimensions=[8, 16, 32])


@pytest.fixture(scope="module")
def server(st_model, tmp_path_factory):
    args = ["--model", str(st_model), "--model_name", MODEL, "--restart-backoff-s", "0.1", "--log-stats-interval", "1"]
    server = start_server(args, tmp_path_factory.mktemp("logs") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def expected(st_model, inputs, dimensions=None):
    """sentence-transformers' mean pooling then Normalize, one input at a time."""
    tokenizer = tf.AutoTokenizer.from_pretrained(st_model)
    model = tf.AutoModel.from_pretrained(st_model, dtype=torch.float32).eval()
    out = []
    for item in inputs:
        enc = (
            tokenizer(item, return_tensors="pt")
            if isinstance(item, str)
            else {"input_ids": torch.tensor([item]), "attention_mask": torch.ones(1, len(item), dtype=torch.long)}
        )
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))[0]
        out.append(torch.nn.functional.normalize(pooled[:dimensions], dim=-1).numpy())
    return np.array(out)


def test_openai_client_inputs_and_formats(client, st_model):
    want = expected(st_model, TEXTS)
    one = client.embeddings.create(model=MODEL, input=TEXTS[0])  # the client asks for base64 by default
    np.testing.assert_allclose(one.data[0].embedding, want[0], atol=1e-5)
    many = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert [d.index for d in many.data] == list(range(len(TEXTS)))
    np.testing.assert_allclose([d.embedding for d in many.data], want, atol=1e-5)
    tokenizer = tf.AutoTokenizer.from_pretrained(st_model)
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    assert many.usage.prompt_tokens == many.usage.total_tokens == sum(len(i) for i in ids)
    by_ids = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in by_ids.data], want, atol=1e-5)
    single_ids = client.embeddings.create(model=MODEL, input=ids[1], encoding_format="float")
    np.testing.assert_allclose(single_ids.data[0].embedding, want[1], atol=1e-5)
    raw = httpx.post(
        client.base_url.join("embeddings").__str__(), json={"input": TEXTS[:2], "encoding_format": "base64"}
    ).json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]]
    np.testing.assert_allclose(decoded, want[:2], atol=1e-5)


def test_matryoshka_dimensions(client, st_model):
    short = client.embeddings.create(model=MODEL, input=TEXTS[:2], dimensions=16, encoding_format="float")
    assert len(short.data[0].embedding) == 16
    np.testing.assert_allclose([d.embedding for d in short.data], expected(st_model, TEXTS[:2], 16), atol=1e-5)
    import openai

    for dims in (10, 0, 64):
        with pytest.raises(openai.BadRequestError) as info:
            client.embeddings.create(model=MODEL, input="x", dimensions=dims)
        assert info.value.body["param"] == "dimensions"


def test_bad_inputs_are_400s(client):
    import openai

    long_text = " ".join(["paris"] * 80)  # 82 tokens > the 64 of sentence_bert_config.json
    for kwargs, param in [
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": long_text}, "input"),
        ({"input": [[1, 2], [10**7]]}, "input"),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            client.embeddings.create(model=MODEL, **kwargs)
        assert info.value.status_code == 400 and info.value.body["param"] == param
    cut = client.embeddings.create(model=MODEL, input=long_text, extra_body={"truncate_prompt_tokens": 10})
    assert cut.usage.prompt_tokens == 10


def test_concurrent_requests_equal_single_ones(client, st_model, server):
    texts = [f"{TEXTS[i % len(TEXTS)]} {'cat ' * (i % 7)}".strip() for i in range(24)]
    want = expected(st_model, texts)
    http = httpx.Client(base_url=server.url, timeout=60)
    before = read_metric(http, "stepserve:prompt_tokens_total", model_name=MODEL)
    with ThreadPoolExecutor(12) as pool:
        got = list(
            pool.map(
                lambda t: client.embeddings.create(model=MODEL, input=t, encoding_format="float").data[0].embedding,
                texts,
            )
        )
    np.testing.assert_allclose(got, want, atol=1e-5)
    tokenizer = tf.AutoTokenizer.from_pretrained(st_model)
    added = read_metric(http, "stepserve:prompt_tokens_total", model_name=MODEL) - before
    assert added == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    assert read_metric(http, "stepserve:request_success_total", model_name=MODEL, finished_reason="stop") >= 24
    assert read_metric(http, "stepserve:e2e_request_latency_seconds_count", model_name=MODEL) >= 24


def test_core_death_fails_fast_and_comes_back(client, server, st_model):
    http = httpx.Client(base_url=server.url, timeout=60)
    os.kill(core_pid(server), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while http.get("/v2/health/ready").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    down = http.post("/v1/embeddings", json={"input": "hello"})
    assert http.get("/v2/health/live").status_code == 200
    assert (
        down.status_code == 503 and down.json()["error"]["type"] == "engine_unavailable"
    )  # a restart loads the model for seconds
    deadline = time.monotonic() + 120
    while http.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    again = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(again.data[0].embedding, expected(st_model, TEXTS[:1])[0], atol=1e-5)
    assert read_metric(http, "stepserve:engine_restarts_total", model_name=MODEL) == 1
    deadline = time.monotonic() + 10
    while "Avg prompt throughput" not in server.log():  # the periodic stats line reads the encoder's counts too
        assert time.monotonic() < deadline, "no stats line in the server log"
        time.sleep(0.2)
