"""Embeddings from decoder models on stepserve's own engine, against transformers computed
directly on the same tiny random checkpoint (float32, 1e-5): every family of the model
registry, each sentence-transformers pooling, prompts chunked by a small
--max-num-batched-tokens, repeated prefixes served from the prefix cache, and over HTTP through
the official openai client (batched and concurrent) on a supervised core process."""

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
from task_models import add_sentence_transformers_files
from tiny_models import write_tiny_family, write_tiny_model

from stepserve.config import EngineConfig
from stepserve.core.outputs import EngineCoreRequest
from stepserve.engine.builder import build_pooling_engine
from stepserve.tasks.config import TaskConfig
from stepserve.tasks.serving import POOLING_PARAMS
from stepserve.tasks.setup import plan_task

SHARED = "the capital of france is paris and "  # 35 bytes: two full blocks of 16, shared by prompts below
TEXTS = ["hello world", "a", SHARED + "the sky is blue", SHARED + "new york is a big city", "x" * 62]


def write_model(directory, family: str, pooling: str):
    if family in ("llama", "qwen2"):
        write_tiny_model(directory, family, seed=8)
    else:
        write_tiny_family(directory, family, seed=8)
    return add_sentence_transformers_files(directory, pooling, normalize=True)  # max_seq_length 64


def reference(directory, texts, pooling: str) -> np.ndarray:
    """sentence-transformers' pooling of transformers' final hidden states, one text at a time,
    before the Normalize module (the core returns the pooled vector; the front normalises)."""
    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    model = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    out = []
    for text in texts:
        with torch.no_grad():
            hidden = model.model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        out.append(
            {"last": hidden[-1], "mean": hidden.mean(0), "cls": hidden[0], "max": hidden.amax(0)}[pooling].numpy()
        )
    return np.array(out)


def pooled(directory, texts, **engine):
    """The engine's pooled vectors for ``texts``, all queued at once; plus the core."""
    config = EngineConfig.from_kwargs(model=str(directory), dtype="float32", **engine)
    spec = plan_task(config, TaskConfig()).spec
    core, _ = build_pooling_engine(config, spec.max_model_len)
    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    ids = [tuple(tokenizer(t)["input_ids"]) for t in texts]
    for i, token_ids in enumerate(ids):
        core.add_request(request(f"r{i}", token_ids, spec.pooling.mode))
    return _drain(core, len(texts)), core


def request(request_id: str, token_ids, mode: str) -> EngineCoreRequest:
    return EngineCoreRequest(request_id, tuple(token_ids), POOLING_PARAMS, pooling=mode)


def _drain(core, count: int) -> np.ndarray:
    out = {}
    while core.has_unfinished:
        for o in core.step():
            assert o.error is None, o.error
            if o.finished:
                out[o.request_id] = o.pooled
    return np.array([out[f"r{i}"] for i in range(count)])


FAMILIES = [
    ("llama", "last"),
    ("llama", "mean"),
    ("qwen2", "last"),
    ("qwen2", "mean"),
    ("qwen3", "last"),
    ("qwen3", "mean"),
    ("qwen3", "cls"),
    ("qwen3", "max"),
    ("mistral", "mean"),
    ("gemma2", "last"),
    ("gemma3", "mean"),
    ("phi3", "last"),
    ("granite", "mean"),
]


@pytest.mark.parametrize(("family", "pooling"), FAMILIES)
def test_pooled_vectors_equal_transformers_chunked_and_batched(tmp_path, family, pooling):
    """All five texts at once with a 24-token pass budget and blocks of 16: the 62-byte prompt
    runs as three chunks, others share passes with its chunks."""
    directory = write_model(tmp_path / family, family, pooling)
    got, core = pooled(directory, TEXTS, max_num_batched_tokens=24, num_blocks=64)
    np.testing.assert_allclose(got, reference(directory, TEXTS, pooling), atol=1e-5, rtol=0)
    assert not core.scheduler.requests and core.stats().kv_cache_usage == 0  # every block handed back


def test_repeated_prefixes_hit_the_prefix_cache_and_give_the_same_vectors(tmp_path):
    """Last-token pooling (Qwen3-Embedding's): the second round finds the shared blocks cached
    and computes only the tails, with the vectors of the first round and of transformers."""
    directory = write_model(tmp_path / "qwen3", "qwen3", "last")
    first, core = pooled(directory, TEXTS[2:4], num_blocks=64)
    hits_before = core.stats().prefix_cache_hits
    assert hits_before == 0  # both were admitted in one pass: nothing was cached yet
    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    for i, text in enumerate(TEXTS[2:4]):
        core.add_request(request(f"r{i}", tokenizer(text)["input_ids"], "last"))
    again = _drain(core, 2)
    assert core.stats().prefix_cache_hits == 96  # each repeat (50 and 57 tokens) found its three full blocks
    np.testing.assert_allclose(again, first, atol=1e-5, rtol=0)  # a different split of the same sums
    np.testing.assert_allclose(again, reference(directory, TEXTS[2:4], "last"), atol=1e-5, rtol=0)
    other = SHARED + "a dog sat on the mat"  # new, but for the shared prefix's two blocks
    core.add_request(request("r0", tokenizer(other)["input_ids"], "last"))
    np.testing.assert_allclose(_drain(core, 1), reference(directory, [other], "last"), atol=1e-5, rtol=0)
    assert core.stats().prefix_cache_hits == 96 + 32


def test_a_base_model_checkpoint_without_its_head(tmp_path):
    """sentence-transformers saves a decoder's base model only: no lm_head, and (untied) no
    embedding standing in for it in config.json. Pooling never reads the head: it loads."""
    import json

    from safetensors import safe_open

    directory = write_tiny_family(tmp_path / "headless", "qwen3", seed=8)
    tf.AutoModelForCausalLM.from_pretrained(directory).model.save_pretrained(
        directory
    )  # weights without "model." and lm_head
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(
        json.dumps(config | {"architectures": ["Qwen3ForCausalLM"]})
    )  # as Qwen3-Embedding's says
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        assert (
            "lm_head.weight" not in f.keys() and "embed_tokens.weight" in f.keys() and not config["tie_word_embeddings"]
        )
    add_sentence_transformers_files(directory, "last", normalize=True)
    got, _ = pooled(directory, TEXTS[:3], num_blocks=64)
    np.testing.assert_allclose(got, reference(directory, TEXTS[:3], "last"), atol=1e-5, rtol=0)


def test_pooling_and_generation_in_one_pass_of_the_runner(tmp_path):
    """A pass that mixes a pooled prompt with greedy generation: the runner computes each kind
    apart and merges them; the tokens equal the request alone, the vector equals transformers,
    and a request failing in the engine (a token id past the vocabulary) fails alone."""
    from stepserve.core.outputs import EngineCoreRequest
    from stepserve.sampling import SamplingParams

    directory = write_model(tmp_path / "llama", "llama", "mean")
    _, core = pooled(directory, [], num_blocks=64, max_num_batched_tokens=24)
    engine = core
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def run(*requests):
        """Each request's outputs, in order."""
        for r in requests:
            engine.add_request(r)
        out = {}
        while engine.has_unfinished:
            for o in engine.step():
                out.setdefault(o.request_id, []).append(o)
        return out

    def tokens(outputs):
        return tuple(t for o in outputs for t in o.new_token_ids)

    alone = tokens(run(EngineCoreRequest("g", (5, 6, 7), greedy))["g"])
    ids = tuple(tf.AutoTokenizer.from_pretrained(directory)(TEXTS[4])["input_ids"])
    mixed = run(
        EngineCoreRequest("g", (5, 6, 7), greedy),
        EngineCoreRequest("p", ids, greedy, pooling="mean"),
        EngineCoreRequest("bad", (5, 10**6), greedy, pooling="mean"),
    )
    assert tokens(mixed["g"]) == alone and len(alone) == 6
    (p,) = mixed["p"]  # one output: its finish, with the vector
    np.testing.assert_allclose(p.pooled, reference(directory, TEXTS[4:], "mean")[0], atol=1e-5, rtol=0)
    (bad,) = mixed["bad"]
    assert bad.finish_reason == "abort" and bad.error is not None and bad.pooled is None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = write_model(tmp_path_factory.mktemp("qwen3-embed") / "qwen3-embed", "qwen3", "last")
    args = [
        "--model",
        str(directory),
        "--model_name",
        "emb",
        "--dtype",
        "float32",
        "--max-num-batched-tokens",
        "24",
        "--num-blocks",
        "64",
        "--restart-backoff-s",
        "0.1",
    ]
    server = start_server(args, tmp_path_factory.mktemp("logs") / "server.log")
    yield server, directory
    server.stop()


def normalized(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_openai_client_batched_and_concurrent_through_the_supervised_core(server):
    openai = pytest.importorskip("openai")
    live, directory = server
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
    want = normalized(reference(directory, TEXTS, "last"))
    batch = client.embeddings.create(model="emb", input=TEXTS, encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in batch.data], want, atol=1e-5, rtol=0)
    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    assert batch.usage.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    texts = [TEXTS[i % len(TEXTS)] for i in range(20)]
    with ThreadPoolExecutor(10) as pool:
        got = list(
            pool.map(lambda t: client.embeddings.create(model="emb", input=t).data[0].embedding, texts)
        )  # base64, the client's default
    np.testing.assert_allclose(got, [want[i % len(TEXTS)] for i in range(20)], atol=1e-5, rtol=0)
    http = httpx.Client(base_url=live.url, timeout=60)
    assert (
        read_metric(http, "stepserve:prefix_cache_hits_total", model_name="emb") > 0
    )  # repeats computed only their tails
    assert read_metric(http, "stepserve:request_success_total", model_name="emb", finished_reason="stop") >= 25
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="emb", input="y" * 65)  # past max_seq_length 64
    assert info.value.body["param"] == "input"


def test_core_death_fails_fast_and_comes_back(server):
    live, directory = server
    http = httpx.Client(base_url=live.url, timeout=60)
    os.kill(core_pid(live), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while http.get("/v2/health/ready").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http.get("/v2/health/ready").status_code == 503 and http.get("/v2/health/live").status_code == 200
    deadline = time.monotonic() + 120
    while http.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline, live.log()
        time.sleep(0.2)
    body = http.post("/v1/embeddings", json={"input": TEXTS[0], "model": "emb"}).json()
    np.testing.assert_allclose(
        body["data"][0]["embedding"], normalized(reference(directory, TEXTS[:1], "last"))[0], atol=1e-5, rtol=0
    )
    assert read_metric(http, "stepserve:engine_restarts_total", model_name="emb") == 1
