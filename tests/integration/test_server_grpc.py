"""KServe v2 over gRPC end to end, with a grpcio client, on a server whose model came from
``--model_id`` through the fake hub: every RPC, the same answers and errors as the REST route,
UNAVAILABLE while the engine core is down."""

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from fake_hub import FakeHub, FakeRepo, repo_from_dir
from live_server import core_pid, free_port, start_server

from stepserve.server.proto import grpc_predict_v2_pb2 as pb
from stepserve.server.proto import grpc_predict_v2_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
MODEL = "org/tiny"  # the hub id is the served name when --model_name is not given
PARAMS = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    grpc_port = free_port()
    home = tmp_path_factory.mktemp("hf")
    with FakeHub({MODEL: FakeRepo(repo_from_dir(tiny_llama))}) as hub, pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", hub.url)
        mp.setenv("HF_HOME", str(home))
        args = [
            "--model_id",
            MODEL,
            "--max-model-len",
            "128",
            "--num-blocks",
            "64",
            "--enable_grpc",
            "--grpc_port",
            str(grpc_port),
        ]
        live = start_server(args, home / "server.log")
    assert (home / "hub" / "models--org--tiny" / "snapshots").is_dir()  # HF_HOME was honoured
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield live, pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()
    live.stop()


def infer_request(texts, model=MODEL, params=PARAMS, **tensor):
    parameters = {
        k: pb.InferParameter(
            **{
                {bool: "bool_param", int: "int64_param"}.get(type(v), "string_param"): v
                if type(v) in (bool, int)
                else str(v)
            }
        )
        for k, v in params.items()
    }
    fields = {
        "name": "text_input",
        "datatype": "BYTES",
        "shape": [len(texts)],
        "contents": pb.InferTensorContents(bytes_contents=[t.encode() for t in texts]),
    } | tensor
    return pb.ModelInferRequest(
        model_name=model, id="g-1", inputs=[pb.ModelInferRequest.InferInputTensor(**fields)], parameters=parameters
    )


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_health_and_metadata(server):
    _, stub = server
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL)).ready
    assert stub.ServerMetadata(pb.ServerMetadataRequest()).name == "stepserve"
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL))
    assert meta.name == MODEL and meta.inputs[0].name == "text_input" and meta.outputs[0].datatype == "BYTES"
    assert (
        rpc_error(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="other"))).code() == grpc.StatusCode.NOT_FOUND
    )


def test_infer_matches_rest(server):
    live, stub = server
    response = stub.ModelInfer(infer_request(["hello", "there"]))
    assert response.model_name == MODEL and response.id == "g-1"
    (tensor,) = response.outputs
    assert tensor.name == "text_output" and tensor.datatype == "BYTES" and list(tensor.shape) == [2]
    texts = [b.decode() for b in tensor.contents.bytes_contents]
    # The REST route can't carry a '/' in the model name: v1 and v2 REST answer the same as
    # /v1/completions, so compare with that (greedy, same parameters).
    rest = httpx.post(
        live.url + "/v1/completions", json={"model": MODEL, "prompt": ["hello", "there"], **PARAMS}, timeout=60
    ).json()
    assert texts == [c["text"] for c in rest["choices"]]
    # BYTES in raw_input_contents (4-byte little-endian length, then the bytes), as KServe's and Triton's clients send.
    raw = b"".join(struct.pack("<I", len(t)) + t for t in (b"hello", b"there"))
    request = infer_request([])
    request.inputs[0].shape[:] = [2]
    request.raw_input_contents.append(raw)
    request.inputs[0].parameters["binary_data_size"].int64_param = len(raw)  # as KServe's client sends it
    assert [b.decode() for b in stub.ModelInfer(request).outputs[0].contents.bytes_contents] == texts


@pytest.mark.parametrize(
    "request_kw, code, words",
    [
        (dict(params={"max_tokens": 0}), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (dict(params={"temperature": "hot"}), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (dict(params={"max_tokens": 2, "bogus": 1}), grpc.StatusCode.INVALID_ARGUMENT, "bogus"),
        (dict(name="prompt"), grpc.StatusCode.INVALID_ARGUMENT, "text_input"),
        (dict(datatype="FP32"), grpc.StatusCode.INVALID_ARGUMENT, "BYTES"),
        (dict(model="other"), grpc.StatusCode.NOT_FOUND, "other"),
    ],
)
def test_errors_as_rest(server, request_kw, code, words):
    _, stub = server
    model = request_kw.pop("model", MODEL)
    params = request_kw.pop("params", PARAMS)
    error = rpc_error(lambda: stub.ModelInfer(infer_request(["hi"], model=model, params=params, **request_kw)))
    assert error.code() == code and words in error.details()


def test_unavailable_while_the_core_is_down(server):
    live, stub = server
    os.kill(core_pid(live), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while stub.ServerReady(pb.ServerReadyRequest()).ready:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert rpc_error(lambda: stub.ModelInfer(infer_request(["hi"]))).code() == grpc.StatusCode.UNAVAILABLE
    assert not stub.ModelReady(pb.ModelReadyRequest(name=MODEL)).ready and stub.ServerLive(pb.ServerLiveRequest()).live
    # (the supervisor's restart is tested over HTTP in test_fault_isolation; this is the last
    # test on this server)


def test_committed_stubs_match_the_proto(tmp_path):
    """The generated code is committed; regenerating it from the proto changes nothing."""
    root = Path(__file__).resolve().parents[2]
    proto = "stepserve/server/proto/grpc_predict_v2.proto"
    (tmp_path / "stepserve/server/proto").mkdir(parents=True)
    (tmp_path / proto).write_bytes((root / proto).read_bytes())
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I.",
        "--python_out=.",
        "--grpc_python_out=.",
        "--pyi_out=.",
        proto,
    ]
    subprocess.run(command, cwd=tmp_path, check=True)
    for name in ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py"):
        assert (tmp_path / "stepserve/server/proto" / name).read_text() == (
            root / "stepserve/server/proto" / name
        ).read_text(), name
