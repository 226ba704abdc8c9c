"""Encoder tasks over HTTP, each against transformers computed directly on the same tiny
random checkpoint: KServe v1/v2 outputs and flags, rerank/score, text2text, startup errors."""

import json

import numpy as np
import pytest
import torch
import transformers as tf
from task_models import add_sentence_transformers_files, write_bert, write_distilbert, write_roberta, write_t5
from tiny_models import write_tiny_model
from task_server import post, serve_in_thread

from stepserve.config import ConfigError, EngineConfig
from stepserve.sampling import mix_seed
from stepserve.tasks.config import TaskConfig
from stepserve.tasks.setup import plan_task

TEXTS = ["hello world", "the capital of france is paris", "a cat sat on the mat", "dog"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-models")
    return {
        "cross": write_bert(root / "cross", "seq", seed=1, num_labels=1),
        "cls3": write_bert(root / "cls3", "seq", seed=2, num_labels=3),
        "token": write_bert(root / "token", "token", seed=6, num_labels=5),
        "mlm": write_bert(root / "mlm", "masked", seed=7),
        "roberta": write_roberta(root / "roberta"),
        "t5": write_t5(root / "t5"),
    }


@pytest.fixture(scope="module")
def servers(models):
    started = {}

    def get(key: str, model: str, *flags: str):
        if key not in started:
            started[key] = serve_in_thread(models[model], *flags)
        return started[key]

    yield get
    for server in started.values():
        server.stop()


def reference(cls, directory, texts, pair=None, **tok_kwargs):
    """transformers, one input at a time: (outputs, encodings)."""
    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    model = cls.from_pretrained(directory, dtype=torch.float32).eval()
    outs, encs = [], []
    for i, text in enumerate(texts):
        enc = tokenizer(text, pair[i] if pair else None, return_tensors="pt", **tok_kwargs)
        with torch.no_grad():
            outs.append(model(**enc))
        encs.append(enc)
    return outs, encs, tokenizer


def predict(server, instances, **parameters):
    body = {"instances": instances} | ({"parameters": parameters} if parameters else {})
    response = post(server, "/v1/models/m:predict", body)
    assert response.status_code == 200, response.text
    return response.json()


def infer(server, texts):
    body = {"id": "r1", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    response = post(server, "/v2/models/m/infer", body)
    assert response.status_code == 200, response.text
    return response.json()


def test_roberta_embeddings_kserve_v1_v2_and_openai(servers, models):
    server = servers("roberta", "roberta", "--task", "text_embedding")
    outs, encs, _ = reference(tf.AutoModel, models["roberta"], TEXTS)
    expected = []
    for out, enc in zip(outs, encs):  # KServe's rule without a sentence-transformers config: mean, then L2
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
        expected.append(torch.nn.functional.normalize(pooled, dim=-1)[0].numpy())
    v1 = predict(server, TEXTS)["predictions"]
    np.testing.assert_allclose(np.array(v1), np.array(expected), atol=1e-5)
    v2 = infer(server, TEXTS)
    (tensor,) = v2["outputs"]
    assert (
        v2["id"] == "r1"
        and tensor["name"] == "output-0"
        and tensor["datatype"] == "FP32"
        and tensor["shape"] == [4, 32]
    )
    np.testing.assert_allclose(np.array(tensor["data"]).reshape(4, 32), np.array(expected), atol=1e-5)
    body = post(server, "/openai/v1/embeddings", {"input": TEXTS, "model": "m"}).json()
    np.testing.assert_allclose(np.array([d["embedding"] for d in body["data"]]), np.array(expected), atol=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(e["input_ids"].shape[1] for e in encs)
    # a bi-encoder reranks by cosine similarity
    ranked = post(server, "/v1/rerank", {"query": TEXTS[0], "documents": TEXTS[1:]}).json()["results"]
    cosines = [float(np.dot(expected[0], e)) for e in expected[1:]]
    assert [r["index"] for r in ranked] == np.argsort(cosines)[::-1].tolist()
    np.testing.assert_allclose(sorted(r["relevance_score"] for r in ranked), sorted(cosines), atol=1e-5)
    meta = httpx_get(server, "/v2/models/m")
    assert meta["outputs"][0] == {"name": "output-0", "datatype": "FP32", "shape": [-1, 32]}


def httpx_get(server, path):
    import httpx

    return httpx.get(server.url + path, timeout=30).json()


def test_embedding_bad_inputs_are_400s_naming_the_field(servers):
    server = servers("roberta", "roberta", "--task", "text_embedding")
    cases = [
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": 5}, "input"),
        ({"input": [1.5]}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": [10**6]}, "input"),
        ({"input": "x" * 200}, "input"),  # 200 byte tokens > 128 positions
        ({"input": "hi", "dimensions": 8}, "dimensions"),  # not a Matryoshka model
        ({"input": "hi", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"input": "hi", "model": "other"}, "model"),
    ]
    for body, param in cases:
        response = post(server, "/v1/embeddings", body)
        expected_status = 404 if param == "model" else 400
        assert response.status_code == expected_status, (body, response.text)
        assert response.json()["error"]["param"] == param, (body, response.text)
    truncated = post(server, "/v1/embeddings", {"input": "x" * 200, "truncate_prompt_tokens": -1}).json()
    assert truncated["usage"]["prompt_tokens"] == 128
    for path, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ("/v1/completions", {"prompt": "x"}),
    ):
        response = post(server, path, body)
        assert response.status_code == 400 and response.json()["error"]["param"] == "model", (path, response.text)


def test_sequence_classification_and_kserve_flags(servers, models):
    outs, _, _ = reference(tf.AutoModelForSequenceClassification, models["cls3"], TEXTS)
    logits = np.array([o.logits[0].numpy() for o in outs])
    plain = servers("cls3", "cls3")
    assert predict(plain, TEXTS)["predictions"] == logits.argmax(-1).tolist()
    (tensor,) = infer(plain, TEXTS)["outputs"]
    assert tensor["datatype"] == "INT64" and tensor["shape"] == [4] and tensor["data"] == logits.argmax(-1).tolist()
    probs = servers("cls3-prob", "cls3", "--return_probabilities")
    got = predict(probs, TEXTS)["predictions"]
    softmax = torch.softmax(torch.tensor(logits, dtype=torch.float64), -1).numpy()
    for row, want in zip(got, softmax):
        assert list(row) == ["0", "1", "2"]  # KServe's {class index: probability}
        np.testing.assert_allclose([row[k] for k in "012"], want, atol=1.5e-4)
        assert all(round(v, 4) == v for v in row.values())
    raw = servers("cls3-raw", "cls3", "--return_raw_logits")
    got = predict(raw, TEXTS)["predictions"]
    np.testing.assert_allclose([[row[k] for k in "012"] for row in got], logits, atol=1e-5)
    (tensor,) = infer(raw, TEXTS[:2])["outputs"]
    assert tensor["datatype"] == "BYTES" and json.loads(tensor["data"][0]).keys() == {"0", "1", "2"}
    assert httpx_get(plain, "/v2/models/m")["outputs"][0]["datatype"] == "INT64"
    assert httpx_get(raw, "/v2/models/m")["outputs"][0]["datatype"] == "BYTES"


def test_rerank_and_score_match_the_cross_encoder(servers, models):
    server = servers("cross", "cross")
    query, docs = "the cat", ["a dog sat", "the cat sat on the mat", "paris", "hello world"]
    outs, _, _ = reference(tf.AutoModelForSequenceClassification, models["cross"], [query] * 4, pair=docs)
    scores = torch.sigmoid(torch.tensor([o.logits[0, 0].item() for o in outs], dtype=torch.float64)).numpy()
    order = np.argsort(-scores).tolist()
    for path in ("/v1/rerank", "/rerank", "/v2/rerank", "/openai/v1/rerank"):
        body = post(server, path, {"query": query, "documents": docs}).json()
        assert [r["index"] for r in body["results"]] == order, path
        np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], scores[order], atol=1e-5)
        assert body["results"][0]["document"] == {"text": docs[order[0]]}
    top = post(
        server,
        "/v1/rerank",
        {"query": query, "documents": [{"text": d} for d in docs], "top_n": 2, "return_documents": False},
    ).json()
    assert [r["index"] for r in top["results"]] == order[:2] and "document" not in top["results"][0]
    one_to_n = post(server, "/v1/score", {"text_1": query, "text_2": docs}).json()
    np.testing.assert_allclose([d["score"] for d in one_to_n["data"]], scores, atol=1e-5)
    n_to_n = post(server, "/v1/score", {"text_1": [query] * 4, "text_2": docs}).json()
    assert [d["index"] for d in n_to_n["data"]] == [0, 1, 2, 3]
    np.testing.assert_allclose([d["score"] for d in n_to_n["data"]], scores, atol=1e-5)
    bad = [
        ("/v1/rerank", {"query": query, "documents": []}, "documents"),
        ("/v1/rerank", {"query": query, "documents": ["a", ""]}, "documents"),
        ("/v1/rerank", {"query": query, "documents": ["a"], "top_n": -1}, "top_n"),
        ("/v1/rerank", {"documents": ["a"]}, "query"),
        ("/v1/rerank", {"query": query, "documents": [3]}, "documents"),
        ("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_2"),
        ("/v1/score", {"text_1": [], "text_2": ["a"]}, "text_1"),
        ("/v1/embeddings", {"input": "a"}, "model"),
    ]
    for path, body, param in bad:
        response = post(server, path, body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (path, body, response.text)


def test_token_classification_with_offsets(servers, models):
    server = servers("token", "token", "--return_offsets_mapping")
    outs, encs, tokenizer = reference(tf.AutoModelForTokenClassification, models["token"], TEXTS)
    body = predict(server, TEXTS)
    assert body["predictions"] == [[o.logits[0].argmax(-1).tolist()] for o in outs]  # KServe's [[class per token]]
    (offsets,) = body["outputs"]
    longest = max(e["input_ids"].shape[1] for e in encs)
    assert offsets["name"] == "offset_mapping" and offsets["shape"] == [4, longest, 2]
    data = np.array(offsets["data"]).reshape(4, longest, 2)
    for i, text in enumerate(TEXTS):
        spans = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        assert data[i, : len(spans)].tolist() == [list(s) for s in spans]
    v2 = infer(server, TEXTS[:2])["outputs"]
    assert [t["name"] for t in v2] == ["output-0", "offset_mapping"] and json.loads(v2[0]["data"][0]) == body[
        "predictions"
    ][0]


def test_fill_mask(servers, models):
    server = servers("mlm", "mlm")
    texts = ["the capital of france is [MASK] .", "[MASK] cat sat on the [MASK]"]
    outs, encs, tokenizer = reference(tf.AutoModelForMaskedLM, models["mlm"], texts)
    expected = []
    for out, enc in zip(outs, encs):
        at = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero()[:, 0]
        expected.append(tokenizer.decode(out.logits[0, at].argmax(-1)))
    assert predict(server, texts)["predictions"] == expected
    response = post(server, "/v1/models/m:predict", {"instances": ["no mask here"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "instances"
    response = post(server, "/v1/models/m:predict", {"instances": ["[MASK]"], "parameters": {"temperature": 0}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "parameters.temperature"
    response = post(
        server, "/v2/models/m/infer", {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [2], "data": ["[MASK]"]}]}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "inputs"
    response = post(server, "/v1/embeddings", {"input": "x", "extra_field": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "extra_field"
    response = post(
        server, "/v2/models/m/infer", {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [1]}]}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "inputs"


def test_text2text_generate_matches_transformers(servers, models):
    server = servers("t5", "t5")
    tokenizer = tf.AutoTokenizer.from_pretrained(models["t5"])
    model = tf.T5ForConditionalGeneration.from_pretrained(models["t5"]).eval()
    prompts = ["hello world", "the cat sat on the mat"]
    expected = []
    for p in prompts:
        out = model.generate(**tokenizer(p, return_tensors="pt"), max_new_tokens=6, do_sample=False, num_beams=1)
        expected.append(tokenizer.decode(out[0], skip_special_tokens=True))
    body = post(server, "/v1/completions", {"prompt": prompts, "max_tokens": 6, "temperature": 0, "n": 2}).json()
    assert [c["text"] for c in body["choices"]] == [expected[0], expected[0], expected[1], expected[1]]
    assert body["usage"]["prompt_tokens"] == sum(len(tokenizer(p).input_ids) for p in prompts)
    assert predict(server, prompts[:1], max_tokens=6, temperature=0)["predictions"] == expected[:1]
    stream = httpx_stream(server, {"prompt": prompts[0], "max_tokens": 6, "temperature": 0, "stream": True})
    assert stream[-1] == "[DONE]" and json.loads(stream[0])["choices"][0]["text"] == expected[0]
    bad = [
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "max_tokens": 1000}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x", "prompt_logprobs": 1}, "prompt_logprobs"),  # generate gives none
        ({"prompt": "x", "guided_regex": "[0-9]+"}, "guided_regex"),  # no grammar reaches generate
        ({"prompt": "x", "response_format": {"type": "json_object"}}, "response_format"),
    ]
    for req, param in bad:
        response = post(server, "/v1/completions", req)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (req, response.text)


def greedy_reference(model, prompt_ids, steps, bias=None, presence=0.0, frequency=0.0, stops=(1,)):
    """Greedy decoding of an encoder-decoder written out: raw logits, plus logit_bias, minus
    frequency * count and presence * seen over the tokens generated so far; the raw logprob of each."""
    decoder, logprobs = [0], []
    for _ in range(steps):
        with torch.no_grad():
            logits = (
                model(input_ids=torch.tensor([prompt_ids]), decoder_input_ids=torch.tensor([decoder]))
                .logits[0, -1]
                .double()
            )
        adjusted = logits.clone()
        for token, value in (bias or {}).items():
            adjusted[token] += value
        counts = torch.bincount(torch.tensor(decoder[1:], dtype=torch.long), minlength=len(logits)).double()
        adjusted -= frequency * counts + presence * (counts > 0).double()
        token = int(adjusted.argmax())
        decoder.append(token)
        logprobs.append(float(logits.log_softmax(-1)[token]))
        if token in stops:
            break
    return decoder[1:], logprobs


def test_text2text_penalties_bias_stops_and_logprobs(servers, models):
    """What generate has no argument for goes through one logits processor, with the LLM
    sampler's formulas; logprobs are the raw model's, as on the LLM path."""
    server = servers("t5", "t5")
    tokenizer = tf.AutoTokenizer.from_pretrained(models["t5"])
    model = tf.T5ForConditionalGeneration.from_pretrained(models["t5"]).eval()
    prompt = "the cat sat on the mat"
    ids = tokenizer(prompt).input_ids
    fields = {"presence_penalty": 0.5, "frequency_penalty": 1.5, "logit_bias": {"20": 3.0}}
    want, want_lps = greedy_reference(model, ids, 10, bias={20: 3.0}, presence=0.5, frequency=1.5)
    assert want != greedy_reference(model, ids, 10)[0]  # the penalties change the answer
    body = post(
        server, "/v1/completions", {"prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 2, **fields}
    ).json()
    (choice,) = body["choices"]
    assert choice["text"] == tokenizer.decode(want, skip_special_tokens=True) and body["usage"][
        "completion_tokens"
    ] == len(want)
    np.testing.assert_allclose(choice["logprobs"]["token_logprobs"], want_lps, atol=1e-4)
    assert all(len(top) >= 2 for top in choice["logprobs"]["top_logprobs"])
    stop = want[3]  # stop_token_ids end the request at that token, which is output
    body = post(
        server,
        "/v1/completions",
        {"prompt": prompt, "max_tokens": 10, "temperature": 0, "stop_token_ids": [stop], **fields},
    ).json()
    assert body["usage"]["completion_tokens"] == want.index(stop) + 1 and body["choices"][0]["finish_reason"] == "stop"
    eos = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "logit_bias": {"1": 100}}  # EOS at once
    assert post(server, "/v1/completions", eos).json()["usage"]["completion_tokens"] == 1
    ignored = post(server, "/v1/completions", eos | {"ignore_eos": True}).json()
    assert ignored["usage"]["completion_tokens"] == 5 and ignored["choices"][0]["finish_reason"] == "length"
    sampled = {"prompt": prompt, "max_tokens": 8, "temperature": 1.0, "min_p": 0.2, "seed": 11}
    texts = {post(server, "/v1/completions", sampled).json()["choices"][0]["text"] for _ in range(2)}
    torch.manual_seed(mix_seed(11, 0))  # choice 0's seed, as on the LLM path
    out = model.generate(
        **tokenizer(prompt, return_tensors="pt"),
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=None,
        min_p=0.2,
        max_new_tokens=8,
        num_beams=1,
    )
    assert texts == {tokenizer.decode(out[0], skip_special_tokens=True)}


def httpx_stream(server, body):
    import httpx

    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_startup_errors_name_the_task(models, tiny_llama):
    def plan(model, task=None):
        return plan_task(EngineConfig.from_kwargs(model=str(model)), TaskConfig(task=task))

    assert plan(tiny_llama) is None  # *ForCausalLM: the LLM engine serves it
    assert plan(models["mlm"]).spec.task == "fill_mask"
    assert plan(models["cross"]).spec.task == "sequence_classification"
    assert plan(models["t5"]).spec.task == "text2text_generation"
    assert plan(tiny_llama, "text_embedding").spec.decoder
    cases = [
        (models["cross"], "fill_mask", "no ForMaskedLM head"),
        (models["roberta"], "sequence_classification", "no ForSequenceClassification head"),
        (models["roberta"], None, "no task can be inferred"),
        (models["mlm"], "summarization", "is not a task"),
        (models["t5"], "text_embedding", "encoder-decoder"),
        (models["t5"], "token_classification", "cannot do token_classification"),
    ]
    for model, task, message in cases:
        with pytest.raises(ConfigError, match=message):
            plan(model, task)
    with pytest.raises(ConfigError, match="exclude each other"):
        TaskConfig(return_probabilities=True, return_raw_logits=True)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_decoder_embeddings_through_our_engine(tmp_path, pooling):
    """A sentence-transformers directory around a *ForCausalLM: stepserve's own model computes
    the final hidden states; pooled and normalised as the config says."""
    directory = add_sentence_transformers_files(
        write_tiny_model(tmp_path / "qwen-embed", "qwen2", seed=8), pooling, normalize=True
    )
    server = serve_in_thread(directory)
    try:
        texts = ["hello world", "a", "the capital of france is paris, over three blocks"]
        tokenizer = tf.AutoTokenizer.from_pretrained(directory)
        model = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        want = []
        for text in texts:
            with torch.no_grad():
                hidden = model.model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
            want.append(
                torch.nn.functional.normalize(hidden[-1] if pooling == "last" else hidden.mean(0), dim=-1).numpy()
            )
        body = post(server, "/v1/embeddings", {"input": texts}).json()
        np.testing.assert_allclose([d["embedding"] for d in body["data"]], want, atol=1e-5)
        np.testing.assert_allclose(
            predict(server, texts[:1])["predictions"][0], want[0], atol=1e-5
        )  # alone: same vector
    finally:
        server.stop()


def test_token_and_mask_flags(servers, models):
    """--return_probabilities on token_classification, --return_raw_logits on fill_mask, and the
    tokenizer flags (--disable_lower_case, --disable_special_tokens, --return_token_type_ids)."""
    outs, _, _ = reference(tf.AutoModelForTokenClassification, models["token"], TEXTS[:2])
    got = predict(servers("token-prob", "token", "--return_probabilities"), TEXTS[:2])["predictions"]
    for row, out in zip(got, outs):
        want = torch.softmax(out.logits[0].double(), -1).numpy()
        assert len(row) == len(want) and list(row[0]) == [str(j) for j in range(5)]
        np.testing.assert_allclose([[tok[str(j)] for j in range(5)] for tok in row], want, atol=1.5e-4)
    text = "The capital of France is [MASK] ."
    raw = predict(servers("mlm-raw", "mlm", "--return_raw_logits"), [text])["predictions"][0]
    (mask_out,) = raw
    outs, encs, tokenizer = reference(tf.AutoModelForMaskedLM, models["mlm"], [text])
    at = (encs[0]["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0]
    np.testing.assert_allclose([next(iter(d.values())) for d in mask_out], outs[0].logits[0, at].numpy(), atol=1e-5)
    assert [next(iter(d)) for d in mask_out] == [str(j) for j in range(len(mask_out))]
    cased = servers("mlm-cased", "mlm", "--disable_lower_case", "--disable_special_tokens", "--return_token_type_ids")
    tokenizer = tf.AutoTokenizer.from_pretrained(models["mlm"], do_lower_case=False)
    model = tf.AutoModelForMaskedLM.from_pretrained(models["mlm"]).eval()
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    assert tokenizer.unk_token_id in enc["input_ids"][0].tolist()  # "The", "France" are unknown once cased
    with torch.no_grad():
        logits = model(**enc).logits[0]
    at = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero()[:, 0]
    assert predict(cased, [text])["predictions"] == [tokenizer.decode(logits[at].argmax(-1))]


def test_one_bad_request_fails_alone_in_the_encoder_engine(models):
    """Invariant 2 (docs/architecture.md) for an encoder model on the one engine core: a request
    the model cannot compute (a token id past the vocabulary, which the front would have
    refused) fails alone; its batch-mates and later requests are answered."""
    from stepserve.core.outputs import ENCODER, EngineCoreRequest
    from stepserve.tasks.serving import POOLING_PARAMS
    from stepserve.tasks.setup import core_factory

    spec = plan_task(EngineConfig.from_kwargs(model=str(models["cls3"])), TaskConfig()).spec
    core, info = core_factory(spec, EngineConfig.from_kwargs(model=str(models["cls3"])))()
    assert info.name == spec.name and info.num_kv_blocks == 0
    good = (2, 40, 41, 3)
    for i, ids in enumerate([good, (2, 10**6, 3), good]):
        core.add_request(EngineCoreRequest(f"r{i}", ids, POOLING_PARAMS, pooling=ENCODER))
    outputs = {o.request_id: o for o in core.step()}
    assert outputs["r1"].error is not None and outputs["r1"].finish_reason == "abort"
    assert outputs["r0"].error is None and outputs["r2"].error is None
    np.testing.assert_allclose(outputs["r0"].pooled, outputs["r2"].pooled, atol=1e-6)
    core.add_request(EngineCoreRequest("r3", good, POOLING_PARAMS, pooling=ENCODER))
    (later,) = core.step()
    np.testing.assert_allclose(later.pooled, outputs["r0"].pooled, atol=1e-6)
    assert not core.has_unfinished


def test_pooling_routes_on_a_generation_model_are_400s(tiny_llama):
    server = serve_in_thread(tiny_llama, "--max-model-len", "128", "--num-blocks", "32")
    try:
        for path, body in (
            ("/v1/embeddings", {"input": "hi"}),
            ("/v1/rerank", {"query": "a", "documents": ["b"]}),
            ("/openai/v1/score", {"text_1": "a", "text_2": "b"}),
        ):
            response = post(server, path, body)
            assert response.status_code == 400 and response.json()["error"]["param"] == "model", (path, response.text)
            assert "serves text_generation" in response.json()["error"]["message"]
        assert post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200
    finally:
        server.stop()


def test_segment_ids_reach_only_models_that_take_them(tmp_path):
    """DistilBERT takes no token_type_ids (transformers 5 swallows them in **kwargs; a strict
    forward would raise): with --return_token_type_ids its embeddings still equal transformers."""
    directory = write_distilbert(tmp_path / "distil")
    server = serve_in_thread(directory, "--task", "text_embedding", "--return_token_type_ids")
    try:
        outs, encs, _ = reference(tf.AutoModel, directory, TEXTS[:2])
        want = [torch.nn.functional.normalize(o.last_hidden_state[0].mean(0), dim=-1).numpy() for o in outs]
        np.testing.assert_allclose(predict(server, TEXTS[:2])["predictions"], want, atol=1e-5)
    finally:
        server.stop()
