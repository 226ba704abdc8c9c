"""Property-based fuzzing of every route with hypothesis: whatever the body, no 5xx, no
dropped connection, the answer is JSON in the OpenAI error shape when it is an error, a stream
ends in one [DONE], and the server stays ready and serving. The schema-aware cases come from
``stepserve.bench.fuzz`` (the generator behind ``stepserve bench fuzz``), driven here by
hypothesis's random source so that a failure shrinks and replays. gRPC ModelInfer gets the same:
whatever the message (or bytes that are not one), a client-error status, never INTERNAL or
UNKNOWN."""

import json
import subprocess
import sys

import grpc
import httpx
import pytest
from hardened_server import MODEL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import read_metric

from stepserve.bench import fuzz

FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "echo",
    "stream",
    "stream_options",
    "user",
    "unknown_field",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "robot", ""]),
            "content": st.text(max_size=30) | values,
        }
    ),
    max_size=3,
)
bodies = st.fixed_dictionaries(
    {"model": st.just(MODEL), "max_tokens": st.integers(1, 4)},
    optional={name: values for name in FIELDS if name not in ("model", "max_tokens")}
    | {"messages": messages, "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 400), max_size=6)},
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
@given(
    route=st.sampled_from(
        ["/v1/completions", "/v1/chat/completions", "/v2/models/tiny/infer", "/v1/models/tiny:predict"]
    ),
    raw=raw_bodies,
)
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


@pytest.fixture(scope="module")
def model_infer(hardened_server):
    """The ModelInfer RPC taking and giving bytes, so that a case can be bytes no client would send."""
    with grpc.insecure_channel(hardened_server.grpc_target) as channel:
        yield channel.unary_unary(fuzz.GRPC_METHOD)


def call_grpc(model_infer, data: bytes) -> tuple[str, str, bytes | None]:
    try:
        return "OK", "", model_infer(data, timeout=120)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or "", None


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(rng=st.randoms(use_true_random=False))
def test_schema_aware_fuzzing_of_grpc_model_infer(model_infer, rng):
    case = fuzz.make_grpc_case(rng, MODEL)
    code, details, response = call_grpc(model_infer, case.request)
    problem = fuzz.check_grpc(case, code, details, response)
    assert problem is None, f"[{case.what}] {case.request!r:.500}: {problem}"


VALID_INFER = fuzz.valid_grpc_request(MODEL).SerializeToString()


@pytest.mark.parametrize(
    "data",
    [
        VALID_INFER[:-3],
        VALID_INFER + b"\x0a\x02\xff\xfe",
        VALID_INFER + b"\x1a\x01\xc3",
        b"\xff" * 8,
        b"\x0a\xff\xff\xff\xff\x0f",
    ],
    ids=["truncated", "model_name not UTF-8", "id not UTF-8", "garbage", "length past the end"],
)
def test_grpc_bytes_that_are_no_message_are_invalid_argument(model_infer, data):
    """grpcio answers a request it cannot parse UNKNOWN, a server error, unless stepserve says otherwise."""
    code, details, _ = call_grpc(model_infer, data)
    assert code == "INVALID_ARGUMENT" and "not a valid protobuf message" in details, (code, details)


def test_bench_fuzz_prints_status_counts(hardened_server):
    command = [
        sys.executable,
        "-m",
        "stepserve",
        "bench",
        "fuzz",
        "--base-url",
        hardened_server.url,
        "--requests",
        "40",
        "--seed",
        "7",
        "--grpc",
        hardened_server.grpc_target,
        "--grpc-requests",
        "20",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        f"fuzzed 40 requests (seed 7) against {hardened_server.url} and 20 gRPC calls" in result.stdout
        and "status counts: " in result.stdout
    )
    assert "5xx: 0, dropped connections: 0, gRPC INTERNAL/UNKNOWN/other: 0, problems: 0" in result.stdout


def test_the_server_is_still_ready_and_serving_after_fuzzing(http, model_infer):
    assert http.get("/v2/health/ready").status_code == 200
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "still here", "max_tokens": 3})
    assert response.status_code == 200
    code, details, answer = call_grpc(model_infer, VALID_INFER)
    assert code == "OK" and fuzz.check_grpc(fuzz.GrpcCase(VALID_INFER, True, "after"), code, details, answer) is None
    assert read_metric(http, "stepserve:engine_restarts_total", model_name=MODEL) == 0
