"""Access control and limits on a live server over TLS: --api-key (401 in OpenAI's shape on every
inference route, probes and /metrics open, the key never logged, gRPC too), CORS, --root-path,
--max-request-body-bytes (413)."""

import argparse
import shutil
import ssl
import subprocess
import sys
import time

import anthropic
import grpc
import httpx
import openai
import pytest
from live_server import LiveServer, free_port

from stepserve.server.access import AccessConfig, access_config_from_args, api_key_ok, is_open_path, route_path
from stepserve.config import ConfigError
from stepserve.server.proto import grpc_predict_v2_pb2 as pb
from stepserve.server.proto import grpc_predict_v2_pb2_grpc as pb_grpc

KEY = "sk-test-0123456789abcdef"
MODEL = "tiny"
ORIGIN = "https://ui.example.com"
LIMIT = 4096


def test_key_from_the_environment(monkeypatch):
    args = argparse.Namespace(**{name: f.default for name, f in AccessConfig.__dataclass_fields__.items()})
    monkeypatch.setenv("STEPSERVE_API_KEY", KEY)
    assert access_config_from_args(args).api_key == KEY
    assert (
        access_config_from_args(argparse.Namespace(**{**vars(args), "api_key": "flag"})).api_key == "flag"
    )  # the flag wins
    monkeypatch.delenv("STEPSERVE_API_KEY")
    assert access_config_from_args(args).api_key is None


def test_key_comparison_and_open_paths():
    assert api_key_ok(None, None)
    assert api_key_ok(KEY, f"Bearer {KEY}") and api_key_ok(KEY, f"bearer {KEY}")
    assert api_key_ok(KEY, None, KEY) and api_key_ok(KEY, "Bearer wrong", KEY) and api_key_ok(KEY, f"Bearer {KEY}", "x")
    assert not api_key_ok(KEY, None, f"{KEY}x") and not api_key_ok(KEY, None, "") and not api_key_ok(KEY, KEY, None)
    assert (
        not api_key_ok(KEY, None)
        and not api_key_ok(KEY, KEY)
        and not api_key_ok(KEY, f"Bearer {KEY}x")
        and not api_key_ok(KEY, f"Basic {KEY}")
    )
    assert all(
        is_open_path(p) for p in ("/health", "/metrics", "/v2/health/live", "/v2/health/ready", "/v2/models/m/ready")
    )
    assert not any(is_open_path(p) for p in ("/v1/models", "/v2/models/m", "/v2/models/m/infer", "/", "/docs"))
    assert KEY not in repr(AccessConfig(api_key=KEY))
    from starlette._utils import get_route_path  # the router's rule: the key check must agree with it

    for path in ("/prefix/v1/models", "/prefix", "/prefixv1/models", "/v1/models", "/prefix/prefix/metrics"):
        scope = {"path": path, "root_path": "/prefix"}
        assert route_path(scope) == get_route_path(scope), path
    with pytest.raises(ConfigError, match="both"):
        AccessConfig(ssl_keyfile="/etc/hostname")
    with pytest.raises(ConfigError, match="empty"):
        AccessConfig(api_key="")
    assert AccessConfig(allowed_origins='["https://a", "https://b"]').origins() == ["https://a", "https://b"]
    assert AccessConfig(allowed_origins="https://a, https://b").origins() == ["https://a", "https://b"]


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(folder / "key.pem"),
            "-out",
            str(folder / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    return folder / "key.pem", folder / "cert.pem"


@pytest.fixture(scope="module")
def server(tiny_llama, tls, tmp_path_factory):
    port, grpc_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("logs") / "server.log"
    args = [
        "--model",
        str(tiny_llama),
        "--model_name",
        MODEL,
        "--max-model-len",
        "128",
        "--num-blocks",
        "64",
        "--host",
        "127.0.0.1",
        "--http_port",
        str(port),
        "--api-key",
        KEY,
        "--allowed-origins",
        ORIGIN,
        "--root-path",
        "/prefix",
        "--max-request-body-bytes",
        str(LIMIT),
        "--ssl-keyfile",
        str(tls[0]),
        "--ssl-certfile",
        str(tls[1]),
        "--enable_grpc",
        "--grpc_port",
        str(grpc_port),
        "--access-log",
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "stepserve", "serve", *args], stdout=log, stderr=subprocess.STDOUT
        )
    live = LiveServer(f"https://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None and time.monotonic() < deadline, live.log()
        try:
            if (
                httpx.get(
                    live.url + "/v2/health/ready", verify=ssl.create_default_context(cafile=str(tls[1])), timeout=2
                ).status_code
                == 200
            ):
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield live, grpc_port
    live.stop()


@pytest.fixture(scope="module")
def http(server, tls):
    with httpx.Client(
        base_url=server[0].url, verify=ssl.create_default_context(cafile=str(tls[1])), timeout=60
    ) as client:
        yield client


AUTH = {"Authorization": f"Bearer {KEY}"}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
GUARDED = [
    ("GET", "/v1/models", None),
    ("GET", "/openai/v1/models", None),
    ("POST", "/v1/completions", COMPLETION),
    (
        "POST",
        "/openai/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    ),
    ("POST", f"/v1/models/{MODEL}:predict", {"instances": ["hi"], "parameters": {"max_tokens": 2}}),
    (
        "POST",
        f"/v2/models/{MODEL}/infer",
        {
            "inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]}],
            "parameters": {"max_tokens": 2},
        },
    ),
    ("GET", f"/v2/models/{MODEL}", None),
]


@pytest.mark.slow
@pytest.mark.parametrize("method, path, body", GUARDED)
def test_inference_routes_need_the_key(http, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = http.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == 401 and error["type"] == "invalid_request_error" and "API key" in error["message"]
    assert http.request(method, path, json=body, headers=AUTH).status_code == 200


@pytest.mark.slow
def test_probes_and_metrics_stay_open(http):
    for path in ("/health", "/metrics", "/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        assert http.get(path).status_code == 200, path


@pytest.mark.slow
def test_openai_client_and_root_path(server, http, tls):
    with httpx.Client(verify=ssl.create_default_context(cafile=str(tls[1]))) as transport:
        client = openai.OpenAI(base_url=server[0].url + "/v1", api_key=KEY, http_client=transport)
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server[0].url + "/v1", api_key="wrong", http_client=transport).models.list()
    # The proxy strips /prefix before the request arrives; the app knows it is served there.
    assert http.get("/openapi.json", headers=AUTH).json()["servers"] == [{"url": "/prefix"}]


@pytest.mark.slow
def test_anthropic_client_sends_x_api_key(server, http, tls):
    hi = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    # the 2.x client speaks through httpx2, whose client it makes itself
    with anthropic.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(tls[1]))) as transport:
        client = anthropic.Anthropic(base_url=server[0].url, api_key=KEY, http_client=transport, max_retries=0)
        assert client.messages.create(**hi).usage.output_tokens <= 2
        wrong = anthropic.Anthropic(base_url=server[0].url, api_key="wrong", http_client=transport, max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as info:
            wrong.messages.create(**hi)
    error = info.value.body  # Anthropic's shape on its routes
    assert error["type"] == "error" and error["error"]["type"] == "authentication_error"
    assert "x-api-key" in error["error"]["message"]
    assert http.post("/v1/completions", json=COMPLETION, headers={"x-api-key": KEY}).status_code == 200
    assert http.post("/v1/completions", json=COMPLETION, headers={"x-api-key": "wrong"}).status_code == 401
    big = http.post("/v1/messages", json=hi | {"system": "x" * LIMIT}, headers={"x-api-key": KEY})
    assert big.status_code == 413 and big.json()["error"]["type"] == "request_too_large"


@pytest.mark.slow
def test_cors(http):
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    response = http.options("/v1/completions", headers=preflight)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ORIGIN
    assert (
        http.options("/v1/completions", headers=preflight | {"Origin": "https://evil.example.com"}).status_code == 400
    )
    denied = http.get("/v1/models", headers={"Origin": ORIGIN})
    assert (
        denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
    )  # the browser may read the 401
    assert (
        "access-control-allow-origin"
        not in http.get("/v1/models", headers={**AUTH, "Origin": "https://evil.example.com"}).headers
    )


@pytest.mark.slow
def test_request_body_limit(http):
    big = {**COMPLETION, "prompt": "x" * LIMIT}
    response = http.post("/v1/completions", json=big, headers=AUTH)
    assert response.status_code == 413 and "max-request-body-bytes" in response.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit holds while the body streams in
        for _ in range(LIMIT // 256 + 2):
            yield b" " * 256

    streamed = http.post("/v1/completions", content=chunks(), headers=AUTH)
    assert streamed.status_code == 413 and "max-request-body-bytes" in streamed.json()["error"]["message"]
    assert http.post("/v1/completions", json=big).status_code == 401  # no key: refused before the body is read
    assert http.post("/v1/completions", json=COMPLETION, headers=AUTH).status_code == 200


@pytest.mark.slow
def test_grpc_needs_the_key_over_tls(server, tls):
    credentials = grpc.ssl_channel_credentials(root_certificates=tls[1].read_bytes())
    with grpc.secure_channel(f"localhost:{server[1]}", credentials) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest()).ready  # probes stay open
        tensor = pb.ModelInferRequest.InferInputTensor(
            name="text_input", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"hi"])
        )
        request = pb.ModelInferRequest(
            model_name=MODEL, inputs=[tensor], parameters={"max_tokens": pb.InferParameter(int64_param=2)}
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.ModelInfer(request, metadata=[("authorization", f"Bearer {KEY}")]).outputs[0].name == "text_output"
        request.inputs[0].contents.bytes_contents[:] = [b"x" * LIMIT]  # over --max-request-body-bytes
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, metadata=[("authorization", f"Bearer {KEY}")])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.slow
def test_the_key_is_never_logged(server, http):
    http.get("/v1/models", headers=AUTH)
    http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}-wrong"})
    log = server[0].log()
    assert "GET /prefix/v1/models" in log  # the access log is on
    assert KEY not in log


def test_pages_opened_for_a_playground():
    """``open_without_key``: a static page loads without the key (it sends the key itself);
    everything else stays guarded, on a bare app through the same middleware."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from stepserve.server.access import open_without_key, secure_app

    app = FastAPI()
    app.get("/")(lambda: {"page": True})
    app.get("/v1/models")(lambda: {"data": []})
    open_without_key(app, "/")
    secure_app(app, AccessConfig(api_key=KEY, root_path=""))
    with TestClient(app) as client:
        assert client.get("/").json() == {"page": True}
        assert client.get("/v1/models").status_code == 401
        assert client.options("/v1/models").status_code == 401  # no CORS configured: no preflight pass
        assert client.get("/v1/models", headers=AUTH).status_code == 200
