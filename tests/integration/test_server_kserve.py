"""KServe v1 and v2 routes, health, and /metrics counters moving (tiny random Llama)."""

import httpx
import pytest
from live_server import read_metric, start_server

MODEL = "tiny"


@pytest.fixture(scope="module")
def http(tiny_llama, tmp_path_factory):
    args = ["--model", str(tiny_llama), "--model_name", MODEL, "--max-model-len", "128", "--num-blocks", "64"]
    server = start_server(args, tmp_path_factory.mktemp("logs") / "server.log")
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client
    server.stop()


def metric(http: httpx.Client, name: str, **labels) -> float:
    return read_metric(http, name, model_name=MODEL, **labels)


def test_v1_predict(http):
    body = {
        "instances": ["hello", {"text": "world"}],
        "parameters": {"max_tokens": 3, "temperature": 0, "ignore_eos": True},
    }
    response = http.post(f"/v1/models/{MODEL}:predict", json=body)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 2 and all(isinstance(p, str) and p for p in predictions)
    again = http.post(f"/v1/models/{MODEL}:predict", json=body).json()["predictions"]
    assert again == predictions  # greedy


def test_v1_model_status(http):
    status = http.get(f"/v1/models/{MODEL}").json()
    assert status["name"] == MODEL and status["ready"] is True
    assert status["id"] == MODEL and status["object"] == "model"  # also OpenAI's models.retrieve
    assert http.get("/v1/models/other").status_code == 404


def test_v2_infer(http):
    body = {
        "id": "req-1",
        "inputs": [{"name": "text_input", "shape": [2], "datatype": "BYTES", "data": ["hello", "there"]}],
        "parameters": {"max_tokens": 4, "temperature": 0, "ignore_eos": True},
    }
    response = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["model_name"] == MODEL and out["id"] == "req-1"
    (tensor,) = out["outputs"]
    assert tensor["name"] == "text_output" and tensor["datatype"] == "BYTES" and tensor["shape"] == [2]
    v1 = http.post(
        f"/v1/models/{MODEL}:predict", json={"instances": ["hello", "there"], "parameters": body["parameters"]}
    )
    assert tensor["data"] == v1.json()["predictions"]


def test_v2_metadata_and_health(http):
    meta = http.get(f"/v2/models/{MODEL}").json()
    assert (
        meta["name"] == MODEL
        and meta["inputs"][0]["name"] == "text_input"
        and meta["outputs"][0]["datatype"] == "BYTES"
    )
    assert http.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    assert http.get("/v2/models/nope/ready").status_code == 404
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.get("/health").status_code == 200


def test_metrics_counters_move(http):
    before = {name: metric(http, f"stepserve:{name}") for name in ("prompt_tokens_total", "generation_tokens_total")}
    success = metric(http, "stepserve:request_success_total", finished_reason="length")
    e2e = metric(http, "stepserve:e2e_request_latency_seconds_count")
    body = {"model": MODEL, "prompt": "count me", "max_tokens": 5, "n": 2, "ignore_eos": True}
    usage = http.post("/v1/completions", json=body).json()["usage"]
    assert metric(http, "stepserve:prompt_tokens_total") == before["prompt_tokens_total"] + 2 * usage["prompt_tokens"]
    assert metric(http, "stepserve:generation_tokens_total") == before["generation_tokens_total"] + 10
    assert metric(http, "stepserve:request_success_total", finished_reason="length") == success + 2
    assert metric(http, "stepserve:e2e_request_latency_seconds_count") == e2e + 2
    assert metric(http, "stepserve:time_to_first_token_seconds_count") >= 2
    assert metric(http, "stepserve:time_per_output_token_seconds_count") >= 2
    text = http.get("/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "engine_restarts_total"):
        assert f"stepserve:{name}{{" in text
    assert metric(http, "stepserve:kv_cache_usage_perc") == 0.0  # nothing in flight
