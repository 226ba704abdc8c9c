"""Property-based fuzzing of every route with hypothesis: whatever the body, no 5xx, no
dropped connection, the answer is JSON in the OpenAI error shape when it is an error, a stream
ends in one [DONE], and the server stays ready and serving. The schema-aware cases come from
``stepserve.bench.fuzz`` (the generator behind ``stepserve bench fuzz``), driven here by
hypothesis's random source so that a failure shrinks and replays."""

import json
import subprocess
import sys

import httpx
import pytest
from hardened_server import MODEL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import read_metric

from stepserve.bench import fuzz

FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "top_k", "min_p",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos",
    "min_tokens", "logprobs", "top_logprobs", "logit_bias", "echo", "stream", "stream_options", "user", "unknown_field",
]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 40),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "robot", ""]), "content": st.text(max_size=30) | values}),
    max_size=3,
)
bodies = st.fixed_dictionaries(
    {"model": st.just(MODEL), "max_tokens": st.integers(1, 4)},
    optional={name: values for name in FIELDS if name not in ("model", "max_tokens")} | {"messages": messages, "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 400), max_size=6)},
)
raw_bodies = st.binary(max_size=60) | st.text(max_size=60).map(str.encode)


@pytest.fixture(scope="module")
def http(hardened_server):
    with httpx.Client(base_url=hardened_server.url, timeout=120) as client:
        yield client


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and "type" in error and "param" in error


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=bodies)
def test_json_bodies_never_cause_a_server_error(http, route, body):
    check(http.post(route, content=json.dumps(body)))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v2/models/tiny/infer", "/v1/models/tiny:predict"]), raw=raw_bodies)
def test_raw_bodies_never_cause_a_server_error(http, route, raw):
    check(http.post(route, content=raw, headers={"content-type": "application/json"}))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(rng=st.randoms(use_true_random=False))
def test_schema_aware_fuzzing_of_every_route(http, rng):
    case = fuzz.make_case(rng, MODEL)
    headers = {"content-type": "application/json"} if case.body is not None else {}
    response = http.request(case.method, case.path, content=case.body, headers=headers)  # a dropped connection raises
    problem = fuzz.check(case, response.status_code, response.headers, response.content)
    assert problem is None, f"{case.method} {case.path} [{case.what}] {case.body!r:.500}: {problem}"


def test_bench_fuzz_prints_status_counts(hardened_server):
    command = [sys.executable, "-m", "stepserve", "bench", "fuzz", "--base-url", hardened_server.url, "--requests", "40", "--seed", "7"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fuzzed 40 requests (seed 7)" in result.stdout and "status counts: " in result.stdout
    assert "5xx: 0, dropped connections: 0, problems: 0" in result.stdout


def test_the_server_is_still_ready_and_serving_after_fuzzing(http):
    assert http.get("/v2/health/ready").status_code == 200
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "still here", "max_tokens": 3})
    assert response.status_code == 200
    assert read_metric(http, "stepserve:engine_restarts_total", model_name=MODEL) == 0
