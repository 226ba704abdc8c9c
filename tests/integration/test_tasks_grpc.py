"""KServe v2 over gRPC for the encoder and pooling tasks, with a grpcio client: ModelInfer
answers as the v2 REST infer route does (embeddings as FP32, class indices as INT64, per-token
classes and offsets, filled-in masks as BYTES), on the same validation, with INVALID_ARGUMENT
for what REST answers with a 400."""

import json

import grpc
import numpy as np
import pytest
from live_server import free_port
from task_models import add_sentence_transformers_files, write_bert, write_sentence_transformer, write_t5
from task_server import post, serve_in_thread
from tiny_models import write_tiny_family

from stepserve.server.proto import grpc_predict_v2_pb2 as pb
from stepserve.server.proto import grpc_predict_v2_pb2_grpc as pb_grpc

TEXTS = ["hello world", "the capital of france is paris", "a cat sat on the mat"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc-task-models")
    qwen3 = add_sentence_transformers_files(write_tiny_family(root / "qwen3", "qwen3", seed=8), "last", normalize=True)
    return {
        "st": write_sentence_transformer(root / "st"),
        "cls3": write_bert(root / "cls3", "seq", seed=2, num_labels=3),
        "token": write_bert(root / "token", "token", seed=6, num_labels=5),
        "mlm": write_bert(root / "mlm", "masked", seed=7),
        "qwen3": qwen3,
        "t5": write_t5(root / "t5"),
    }


@pytest.fixture(scope="module")
def servers(models):
    started = {}

    def get(model: str, *flags: str):
        key = (model, flags)
        if key not in started:
            port = free_port()
            server = serve_in_thread(models[model], *flags, grpc_port=port)
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            started[key] = (server, channel, pb_grpc.GRPCInferenceServiceStub(channel))
        return started[key][0], started[key][2]

    yield get
    for server, channel, _ in started.values():
        channel.close()
        server.stop()


def grpc_request(texts, parameters=None, outputs=None, datatype="BYTES", name="text", **contents):
    contents = contents or {"bytes_contents": [t.encode() for t in texts]}
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=[len(texts)], contents=pb.InferTensorContents(**contents)
    )
    params = {
        k: pb.InferParameter(int64_param=v) if isinstance(v, int) else pb.InferParameter(string_param=v)
        for k, v in (parameters or {}).items()
    }
    requested = [pb.ModelInferRequest.InferRequestedOutputTensor(name=o) for o in outputs or ()]
    return pb.ModelInferRequest(model_name="m", id="t-1", inputs=[tensor], parameters=params, outputs=requested)


def rest_infer(server, texts, parameters=None, name="text"):
    body = {"id": "t-1", "inputs": [{"name": name, "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    response = post(server, "/v2/models/m/infer", body | ({"parameters": parameters} if parameters else {}))
    assert response.status_code == 200, response.text
    return response.json()["outputs"]


def tensor_data(tensor) -> list:
    """The message tensor's elements, as the REST body carries them."""
    field = {"FP32": "fp32_contents", "INT64": "int64_contents", "BYTES": "bytes_contents"}[tensor.datatype]
    values = list(getattr(tensor.contents, field))
    return [v.decode() for v in values] if tensor.datatype == "BYTES" else values


def assert_same_outputs(response, rest):
    assert response.model_name == "m" and response.id == "t-1"
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        (t["name"], t["datatype"], t["shape"]) for t in rest
    ]
    for tensor, want in zip(response.outputs, rest):
        if tensor.datatype == "FP32":  # float32 on the wire; the REST JSON holds the same float32 values
            np.testing.assert_array_equal(
                np.asarray(tensor_data(tensor), dtype=np.float32), np.asarray(want["data"], dtype=np.float32)
            )
        else:
            assert tensor_data(tensor) == want["data"]


@pytest.mark.parametrize(
    ("model", "flags", "datatype"),
    [
        ("st", (), "FP32"),  # sentence-transformers BERT: mean pooling, normalised
        ("qwen3", (), "FP32"),  # a decoder embedding model on our engine
        ("cls3", (), "INT64"),
        ("cls3", ("--return_probabilities",), "BYTES"),
        ("token", ("--return_offsets_mapping",), "BYTES"),
        ("mlm", (), "BYTES"),
    ],
)
def test_model_infer_answers_as_the_rest_route(servers, model, flags, datatype):
    server, stub = servers(model, *flags)
    texts = ["the capital of france is [MASK] .", "a [MASK] sat on the mat"] if model == "mlm" else TEXTS
    response = stub.ModelInfer(grpc_request(texts))
    assert response.outputs[0].datatype == datatype
    assert_same_outputs(response, rest_infer(server, texts))
    if model == "token":
        assert [t.name for t in response.outputs] == ["output-0", "offset_mapping"]
        assert len(json.loads(tensor_data(response.outputs[0])[0])) == 1  # one instance's per-token classes
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="m"))
    assert meta.outputs[0].datatype == datatype


def test_embeddings_equal_the_openai_route_and_take_parameters(servers):
    server, stub = servers("st")
    response = stub.ModelInfer(grpc_request(TEXTS, outputs=["output-0"]))
    vectors = np.asarray(response.outputs[0].contents.fp32_contents).reshape(list(response.outputs[0].shape))
    body = post(server, "/v1/embeddings", {"input": TEXTS}).json()
    np.testing.assert_allclose(vectors, [d["embedding"] for d in body["data"]], atol=1e-6, rtol=0)
    cut = stub.ModelInfer(grpc_request(TEXTS[1:2], parameters={"truncate_prompt_tokens": 3}))
    assert_same_outputs(cut, rest_infer(server, TEXTS[1:2], {"truncate_prompt_tokens": 3}))
    assert not np.allclose(cut.outputs[0].contents.fp32_contents, vectors[1])


def test_text2text_generates_as_the_rest_route(servers):
    """text2text answers KServe v2 as generation does (text_output), here greedy with logprobs."""
    server, stub = servers("t5")
    parameters = {"temperature": 0, "max_tokens": 5, "logprobs": 1}
    response = stub.ModelInfer(
        grpc_request(TEXTS[:2], parameters=parameters, name="text_input")
    )  # generation's input name
    assert [t.name for t in response.outputs] == ["text_output", "logprobs"]
    assert_same_outputs(response, rest_infer(server, TEXTS[:2], parameters, name="text_input"))
    assert all(len(json.loads(lp)["token_logprobs"]) >= 1 for lp in tensor_data(response.outputs[1]))


@pytest.mark.parametrize(
    ("request_kw", "words"),
    [
        ({"texts": []}, "non-empty list of strings"),
        ({"texts": ["x"], "datatype": "INT64", "int64_contents": [5]}, "datatype BYTES"),
        ({"texts": [" ".join(["paris"] * 80)]}, "64"),  # past sentence_bert_config's max_seq_length
        ({"texts": ["x"], "outputs": ["logits"]}, "cannot be produced"),
        ({"texts": ["x"], "parameters": {"temperature": "hot"}}, "parameters.temperature"),
        ({"texts": ["x"], "parameters": {"truncate_prompt_tokens": "three"}}, "must be an integer"),
    ],
)
def test_bad_input_is_invalid_argument(servers, request_kw, words):
    server, stub = servers("st")
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(grpc_request(**request_kw))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert words in info.value.details()
    two = grpc_request(["x"])
    two.inputs.append(two.inputs[0])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(two)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exactly one" in info.value.details()
