"""Schema-aware fuzzing of every route: ``stepserve bench fuzz --requests N --seed S``.

Each case starts from a valid request of a route and replaces a few of its fields (taken from
the request models' own fields, nested ones included) with boundary values of the field's type
(integer limits and just past them, NaN, +/-inf, -0.0, empty and huge strings and lists, deep
nesting), values of another type, or unicode edge cases (lone surrogates, NUL, combining marks,
right-to-left, emoji, invalid UTF-8 bytes); some cases are sent unchanged, some break the body's
syntax, some hit GET routes with odd names. The pooling routes (embeddings, rerank, score) are
fuzzed too; on a generation server their valid bodies are a 400, which is all right. Every
answer is checked: no 5xx, no dropped connection, an error in the OpenAI shape, a stream that
ends in exactly one ``[DONE]`` with no 5xx error event. With ``--grpc HOST:PORT``, KServe's
gRPC ModelInfer is fuzzed too (odd tensors, datatypes, shapes, contents, raw contents, parameters,
and bytes that are not a message at all): every answer must be OK or a client error status
(INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED), never INTERNAL or UNKNOWN. The same
generators drive the test suite's fuzzer (tests/integration/test_fuzz.py).

Run it against a server started with a small ``--default-max-tokens`` (say 16): requests that
leave ``max_tokens`` out on chat otherwise generate to the end of the context.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import struct
import sys
import time
import types
import typing
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import quote

import grpc
import httpx
from pydantic import BaseModel

from stepserve.server.proto import grpc_predict_v2_pb2 as pb
from stepserve.server.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    KServeV1Request,
    KServeV2Request,
    KServeV2Tensor,
)
from stepserve.server.schemas import EmbeddingRequest, RerankRequest, ScoreRequest


@dataclass(frozen=True)
class Raw:
    """Bytes placed into the body as they are (NaN, invalid UTF-8, deep nesting...)."""

    data: bytes


@dataclass(frozen=True)
class FuzzCase:
    method: str  # GET or POST
    path: str  # already percent-encoded
    body: bytes | None  # None for GET
    valid: bool  # an unchanged valid request: must be served (200, or 429 when full)
    what: str  # which mutation, for reports


@dataclass
class FuzzReport:
    statuses: Counter = field(default_factory=Counter)  # HTTP status -> count
    problems: list[str] = field(default_factory=list)  # what broke the contract


# -- values -------------------------------------------------------------------------------

INT_EDGES = (
    0,
    1,
    -1,
    2,
    127,
    128,
    129,
    2**15,
    32000,
    49152,
    151936,
    2**31 - 1,
    2**31,
    -(2**31),
    -(2**31) - 1,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64,
    10**30,
)
FLOAT_EDGES = (0.0, -0.0, 5e-324, 1e-5, 0.5, 1.0, 1.0000001, 2.0, 2.0000001, 100.0, 100.00001, -1e-300, 1e308, -1e308)
RAW_NUMBERS = (
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e999",
    b"-1e999",
    b"1" * 400,
    b"1.5e-400",
    b"0x10",
    b"01",
    b"+1",
    b"1.",
    b".5",
)
STRINGS = (
    "",
    " ",
    "\u0000",
    "a\u0000b",
    "e\u0301\u0301\u0301",
    "\u202eevil",
    "\u05e9\u05dc\u05d5\u05dd",
    "\u0645\u0631\u062d\u0628\u0627",
    "\U0001f600" * 8,
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "<|im_end|>",
    "<|endoftext|>",
    "{{ 7*7 }}",
    "{% raw %}",
    "\\",
    '"',
    "\r\n",
    "x" * 5000,
    "hello",
)
RAW_STRINGS = (
    b'"\\ud800"',
    b'"\\udfff x"',
    b'"a\\ud83d"',
    b'"\xff\xfe"',
    b'"\xed\xa0\x80"',
    b'"\xc3"',
    b'"\\u0000"',
    b'"\\x41"',
    b'"\t"',
)


def _deep(rng: random.Random) -> Raw:
    depth = rng.choice((62, 63, 64, 65, 200, 1023, 1024, 1025, 5000, 50_000))
    inner = rng.choice((b"1", b'"x"', b"{}", b'{"role": "user", "content": "x"}'))
    opener = rng.choice((b"[", b'{"a":'))
    closer = b"]" if opener == b"[" else b"}"
    return Raw(opener * depth + inner + closer * depth)


def _scalar(rng: random.Random):
    pick = rng.randrange(8)
    if pick == 0:
        return rng.choice(INT_EDGES) * rng.choice((1, -1))
    if pick == 1:
        return rng.choice(FLOAT_EDGES)
    if pick == 2:
        return Raw(rng.choice(RAW_NUMBERS))
    if pick == 3:
        return rng.choice(STRINGS)
    if pick == 4:
        return Raw(rng.choice(RAW_STRINGS))
    if pick == 5:
        return rng.choice((True, False, None))
    if pick == 6:
        return rng.randint(-3, 40)
    return "".join(
        chr(rng.choice((rng.randint(32, 126), rng.randint(0x80, 0x2FFF), rng.randint(0xE000, 0x10FFFF))))
        for _ in range(rng.randint(0, 12))
    )


def _junk(rng: random.Random, depth: int = 0):
    """Any JSON-ish value, including nested containers of junk."""
    pick = rng.randrange(10)
    if pick == 0 and depth < 3:
        return [_junk(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if pick == 1 and depth < 3:
        return {
            rng.choice(STRINGS[:8] + ("role", "content", "text", "type")): _junk(rng, depth + 1)
            for _ in range(rng.randint(0, 3))
        }
    if pick == 2:
        return _deep(rng)
    if pick == 3:
        return [rng.choice((0, 1, "x", "", None))] * rng.choice((0, 1, 1000, 5000))
    return _scalar(rng)


def _kinds(annotation) -> set[str]:
    """The JSON kinds a field's annotation accepts: int, float, bool, str, list, dict, null."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {"str"}
    if origin is list or annotation is list:
        return {"list"}
    if origin is dict or annotation is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return {"dict"}
    if annotation is type(None):
        return {"null"}
    names = {int: "int", float: "float", bool: "bool", str: "str"}
    for python, kind in names.items():
        if annotation is python or (isinstance(annotation, type) and issubclass(annotation, python)):
            return {kind}
    return {"int", "float", "str"}  # constrained types (FiniteFloat, StrictBool...) fall back to the usual suspects


def _of_kind(rng: random.Random, kind: str):
    if kind == "int":
        return rng.choice(INT_EDGES) * rng.choice((1, -1)) if rng.random() < 0.7 else rng.randint(-2, 64)
    if kind == "float":
        return rng.choice(FLOAT_EDGES) * rng.choice((1, -1)) if rng.random() < 0.8 else Raw(rng.choice(RAW_NUMBERS))
    if kind == "bool":
        return rng.choice((True, False))
    if kind == "str":
        return rng.choice(STRINGS) if rng.random() < 0.8 else Raw(rng.choice(RAW_STRINGS))
    if kind == "list":
        item = rng.choice((1, "a", 2**31, "", None, "\u0000"))
        return [] if rng.random() < 0.3 else [item] * rng.choice((1, 2, 17, 1000, 5000))
    if kind == "dict":
        return {} if rng.random() < 0.5 else {str(rng.choice(INT_EDGES)): rng.choice(FLOAT_EDGES)}
    return None


def field_value(rng: random.Random, annotation) -> object:
    """A value for a field of this type: its own kind at a boundary, another kind, or junk."""
    kinds = sorted(_kinds(annotation))
    roll = rng.random()
    if roll < 0.55:
        return _of_kind(rng, rng.choice(kinds))
    if roll < 0.8:
        return _of_kind(rng, rng.choice(["int", "float", "bool", "str", "list", "dict", "null"]))
    return _junk(rng)


# -- requests -----------------------------------------------------------------------------


def _valid_bodies(model: str) -> dict[str, tuple[dict, type[BaseModel]]]:
    """Route -> (a valid body, its request model)."""
    v2_tensor = {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]}
    return {
        "/v1/completions": ({"model": model, "prompt": "hello", "max_tokens": 2}, CompletionRequest),
        "/v1/chat/completions": (
            {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            ChatCompletionRequest,
        ),
        "/openai/v1/completions": ({"model": model, "prompt": [1, 2, 3], "max_tokens": 2}, CompletionRequest),
        "/openai/v1/chat/completions": (
            {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            ChatCompletionRequest,
        ),
        f"/v1/models/{model}:predict": ({"instances": ["hi"], "parameters": {"max_tokens": 2}}, KServeV1Request),
        f"/v2/models/{model}/infer": ({"inputs": [v2_tensor], "parameters": {"max_tokens": 2}}, KServeV2Request),
    } | _pooling_bodies(model)


POOLING_ROUTES = ("/v1/embeddings", "/v1/rerank", "/v1/score")  # a generation server answers them 400


def _pooling_bodies(model: str) -> dict[str, tuple[dict, type[BaseModel]]]:
    return {
        "/v1/embeddings": ({"model": model, "input": ["hello", "world"]}, EmbeddingRequest),
        "/v1/rerank": ({"model": model, "query": "hi", "documents": ["a", {"text": "b"}], "top_n": 1}, RerankRequest),
        "/v1/score": ({"model": model, "text_1": "hi", "text_2": ["a", "b"]}, ScoreRequest),
    }


def _mutate(rng: random.Random, body: dict, schema: type[BaseModel]) -> str:
    """Change one field of ``body`` in place (a top-level, nested or unknown one); what changed."""
    target, fields, where = body, schema.model_fields, ""
    if _first_dict(body, "parameters") and rng.random() < 0.7:  # KServe: the sampling fields live in parameters
        target, fields, where = body["parameters"], CompletionRequest.model_fields, "parameters."
    elif _first_dict(body, "messages") and rng.random() < 0.3:
        target, fields, where = body["messages"][0], ChatMessage.model_fields, "messages[0]."
    elif _first_dict(body, "inputs") and rng.random() < 0.5:
        target, fields, where = body["inputs"][0], KServeV2Tensor.model_fields, "inputs[0]."
    roll = rng.random()
    if roll < 0.08:
        name = rng.choice(sorted(target)) if target else "x"
        target.pop(name, None)
        return f"drop {where}{name}"
    if roll < 0.14:
        target[rng.choice(("unknown_field", "best_of", "suffix", "\u0000", "", "tools"))] = _junk(rng)
        return f"extra field in {where or 'body'}"
    name = rng.choice(sorted(fields))
    target[name] = field_value(rng, fields[name].annotation)
    if name == "stream" and target[name] is True and rng.random() < 0.5:
        target["stream_options"] = {"include_usage": rng.choice((True, False, "yes"))}
    return f"{where}{name}"


def _first_dict(body: dict, name: str) -> bool:
    """Whether ``body[name]`` is an object, or a list whose first item is one (not yet mutated away)."""
    value = body.get(name)
    return (
        isinstance(value, dict)
        if name == "parameters"
        else isinstance(value, list) and bool(value) and isinstance(value[0], dict)
    )


def encode(value) -> bytes:
    """JSON text of ``value`` with ``Raw`` parts spliced in; escapes keep lone surrogates."""
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, dict):
        return b"{" + b",".join(encode(str(k)) + b":" + encode(v) for k, v in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(encode(v) for v in value) + b"]"
    return json.dumps(value).encode()


def _get_case(rng: random.Random, model: str) -> FuzzCase:
    name = rng.choice(
        (model, model, "", "x" * 3000, "\u0000", "..", "%", "\u202e\U0001f600", "a/b", "%ff", model + "\u0301")
    )
    template = rng.choice(
        (
            "/v1/models",
            "/openai/v1/models",
            "/v1/models/{}",
            "/v2/models/{}",
            "/v2/models/{}/ready",
            "/v2/health/live",
            "/v2/health/ready",
            "/health",
            "/v2",
            "/metrics",
            "/v1/{}",
            "/{}",
        )
    )
    return FuzzCase("GET", template.format(quote(name, safe="")), None, False, f"GET {template}")


def make_case(rng: random.Random, model: str) -> FuzzCase:
    """One request: mostly a mutated POST body, some valid ones, some broken syntax and GETs."""
    roll = rng.random()
    if roll < 0.08:
        return _get_case(rng, model)
    routes = _valid_bodies(model)
    path = rng.choice(sorted(routes))
    body, schema = json.loads(json.dumps(routes[path][0])), routes[path][1]
    if roll < 0.2:  # valid, and served unless the route belongs to another task than the server's
        return FuzzCase("POST", path, encode(body), path not in POOLING_ROUTES, "valid")
    if roll < 0.27:
        raw = encode(body)
        cut = rng.randrange(len(raw) + 1)
        broken = rng.choice(
            (
                raw[:cut],
                raw[:cut] + bytes([rng.randrange(256)]) + raw[cut:],
                b"",
                b"null",
                b"[]",
                b"\xef\xbb\xbf" + raw,
                _deep(rng).data,
            )
        )
        return FuzzCase("POST", path, broken, False, "syntax")
    what = [_mutate(rng, body, schema) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
    return FuzzCase("POST", path, encode(body), False, ", ".join(what))


# -- checking answers ---------------------------------------------------------------------


def check(case: FuzzCase, status: int, headers: httpx.Headers, content: bytes) -> str | None:
    """What is wrong with this answer, or None."""
    if status >= 500:
        return f"HTTP {status}: {content[:300]!r}"
    if case.valid and status not in (200, 429):
        return f"a valid request got HTTP {status}: {content[:300]!r}"
    if status >= 400:
        return _check_error_body(status, content)
    if headers.get("content-type", "").startswith("text/event-stream"):
        return _check_stream(content)
    return None


def _check_error_body(status: int, content: bytes) -> str | None:
    try:
        error = json.loads(content)["error"]
        ok = (
            isinstance(error["message"], str)
            and error["message"]
            and isinstance(error["type"], str)
            and "param" in error
        )
    except (ValueError, KeyError, TypeError):
        ok = False
    return None if ok else f"HTTP {status} without an OpenAI error body: {content[:300]!r}"


def _check_stream(content: bytes) -> str | None:
    events = [line[5:].strip() for line in content.decode("utf-8", "replace").splitlines() if line.startswith("data:")]
    if not events or events[-1] != "[DONE]" or events.count("[DONE]") != 1:
        return f"a stream did not end with exactly one [DONE]: {content[-300:]!r}"
    for event in events[:-1]:
        error = json.loads(event).get("error")
        if error is not None and not (isinstance(error.get("code"), int) and error["code"] < 500):
            return f"a stream carried a server error: {event[:300]}"
    return None


async def send(client: httpx.AsyncClient, case: FuzzCase) -> tuple[int, str | None]:
    """(status, problem) for one case; a dropped connection is a problem with status 0."""
    headers = {"content-type": "application/json"} if case.body is not None else {}
    try:
        response = await client.request(case.method, case.path, content=case.body, headers=headers)
    except httpx.HTTPError as exc:
        return 0, f"dropped connection: {type(exc).__name__}: {exc}"
    return response.status_code, check(case, response.status_code, response.headers, response.content)


# -- gRPC ModelInfer ----------------------------------------------------------------------

GRPC_METHOD = "/inference.GRPCInferenceService/ModelInfer"
# The client's fault (the REST route's 400, 404, 413, 429), or OK; never INTERNAL or UNKNOWN.
GRPC_ALLOWED = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"})
DATATYPES = (
    "BYTES",
    "BYTES",
    "FP32",
    "FP64",
    "INT32",
    "INT64",
    "UINT8",
    "BOOL",
    "FP16",
    "STRING",
    "bytes",
    "",
    "\u0000",
    "\U0001f600",
)
SHAPES = ([], [0], [1], [2], [-1], [1, 1], [1, -1], [2**31], [2**63 - 1], [-(2**63)], [1] * 64, [10**6, 10**6])
BAD_UTF8 = (b"\xff\xfe", b"\xed\xa0\x80", b"\xc3", b"a\x80b", b"\xf4\x90\x80\x80", b"\xc0\xaf")


@dataclass(frozen=True)
class GrpcCase:
    request: bytes  # a serialized ModelInferRequest, or bytes that are almost one
    valid: bool  # an unchanged valid request: must be served (OK, or RESOURCE_EXHAUSTED when full)
    what: str  # which mutation, for reports


def valid_grpc_request(model: str):
    """A ModelInferRequest that must be served: one BYTES text_input, max_tokens 2."""
    contents = pb.InferTensorContents(bytes_contents=[b"hi"])
    tensor = pb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1], contents=contents)
    return pb.ModelInferRequest(
        model_name=model, id="fuzz", inputs=[tensor], parameters={"max_tokens": pb.InferParameter(int64_param=2)}
    )


def _grpc_param(rng: random.Random):
    kind = rng.randrange(3)
    if kind == 0:
        return pb.InferParameter(int64_param=max(-(2**63), min(2**63 - 1, _of_kind(rng, "int"))))
    if kind == 1:
        return pb.InferParameter(bool_param=rng.choice((True, False)))
    text = rng.choice(
        STRINGS + ("NaN", "inf", "-1e999", "1e308", "2147483648", "true", "[1, 2]", '{"type": "json_object"}')
    )
    return pb.InferParameter(string_param=text)


def _grpc_contents(rng: random.Random, tensor) -> str:
    contents = tensor.contents
    pick = rng.randrange(6)
    if pick == 0:
        contents.bytes_contents[:] = [
            rng.choice(BAD_UTF8 + (b"", b"\x00", b"x" * 100_000, "\u202e\U0001f600".encode()))
        ]
        return "bytes_contents"
    if pick == 1:
        contents.bytes_contents[:] = [b"a"] * rng.choice((0, 2, 5000))
        return "bytes_contents count"
    if pick == 2:
        contents.fp32_contents[:] = [rng.choice((float("nan"), float("inf"), -0.0, 1e38))] * rng.randint(1, 3)
        return "fp32_contents"
    if pick == 3:
        contents.int64_contents[:] = [rng.choice((2**63 - 1, -(2**63), 0))]
        return "int64_contents"
    if pick == 4:
        contents.bool_contents[:] = [True]
        return "bool_contents"
    contents.Clear()
    return "no contents"


def _grpc_raw(rng: random.Random, request) -> str:
    """``raw_input_contents`` in place of the contents: well-formed, or with a bad length prefix."""
    request.inputs[0].contents.Clear()
    item = rng.choice((b"hi", b"") + BAD_UTF8)
    raw = struct.pack("<I", len(item)) + item
    raw = rng.choice((raw, raw[:-1], b"\xff\xff\xff\xff" + item, b"\x01\x00", raw + b"\x00"))
    request.raw_input_contents[:] = [raw] * rng.choice((1, 1, 2))
    if rng.random() < 0.5:
        request.inputs[0].parameters["binary_data_size"].int64_param = rng.choice((len(raw), -1, 2**63 - 1))
    return "raw_input_contents"


def _grpc_mutate(rng: random.Random, request, model: str) -> str:
    """Change one part of a valid ModelInferRequest in place; what changed."""
    pick = rng.randrange(9) if request.inputs else rng.choice((0, 5, 8))  # the others change the input tensor
    tensor = request.inputs[0] if request.inputs else None
    if pick == 0:
        request.model_name = rng.choice(("", "x" * 3000, "\u0000", "..", model + "\u0301", "\u202e\U0001f600"))
        return "model_name"
    if pick == 1:
        tensor.datatype = rng.choice(DATATYPES)
        return "datatype"
    if pick == 2:
        tensor.shape[:] = rng.choice(SHAPES)
        return "shape"
    if pick == 3:
        return _grpc_contents(rng, tensor)
    if pick == 4:
        return _grpc_raw(rng, request)
    if pick == 5:
        request.parameters[
            rng.choice(sorted(CompletionRequest.model_fields) + ["bogus", "", "max_new_tokens", "do_sample"])
        ].CopyFrom(_grpc_param(rng))
        return "parameters"
    if pick == 6:
        tensor.name = rng.choice(("", "prompt", "text_input\u0000", "TEXT_INPUT"))
        return "input name"
    if pick == 7:
        extra, copy = rng.choice((0, 2, 50)), type(tensor)()
        copy.CopyFrom(tensor)
        del request.inputs[:]
        request.inputs.extend([copy] * extra)
        return f"{extra} inputs"
    request.outputs.add(name=rng.choice(("text_output", "logprobs", "bogus", "", "x" * 1000)))
    return "outputs"


def _wire_mutate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Bytes a protobuf client would not send: cut, garbled, or a string field holding bad UTF-8."""
    pick = rng.randrange(4)
    if pick == 0:
        return data[: rng.randrange(len(data) + 1)], "wire: truncated"
    if pick == 1:
        i = rng.randrange(len(data) + 1)
        return data[:i] + bytes([rng.randrange(256)]) + data[i:], "wire: a byte inserted"
    if pick == 2:
        bad = rng.choice(BAD_UTF8)
        field = rng.choice((0x0A, 0x12, 0x1A))  # model_name, model_version, id: proto3 strings must be UTF-8
        return data + bytes([field, len(bad)]) + bad, "wire: a string field that is not UTF-8"
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))), "wire: random bytes"


def make_grpc_case(rng: random.Random, model: str) -> GrpcCase:
    """One ModelInfer call: mostly a mutated valid request, some valid ones, some broken wire bytes."""
    request = valid_grpc_request(model)
    roll = rng.random()
    if roll < 0.12:
        return GrpcCase(request.SerializeToString(), True, "valid")
    what = ", ".join(_grpc_mutate(rng, request, model) for _ in range(rng.choice((1, 1, 2, 3))))
    data = request.SerializeToString()
    if roll < 0.25:
        data, wire = _wire_mutate(rng, data)
        what = f"{what}, {wire}"
    return GrpcCase(data, False, what)


def check_grpc(case: GrpcCase, code: str, details: str, response: bytes | None) -> str | None:
    """What is wrong with this gRPC answer (``code`` a StatusCode name), or None."""
    if code not in GRPC_ALLOWED:
        return f"status {code}: {details[:300]}"
    if case.valid and code not in ("OK", "RESOURCE_EXHAUSTED"):
        return f"a valid request got {code}: {details[:300]}"
    if code == "OK":
        outputs = pb.ModelInferResponse.FromString(response).outputs
        if not outputs or not all(o.datatype == "BYTES" for o in outputs):
            return f"OK without BYTES outputs: {response[:300]!r}"
    return None


async def send_grpc(channel, case: GrpcCase, timeout: float) -> tuple[str, str | None]:
    """(status code name, problem) for one case over a ``grpc.aio`` channel."""
    call = channel.unary_unary(GRPC_METHOD)  # no serializers: the case's bytes go out as they are
    try:
        response = await call(case.request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, check_grpc(case, exc.code().name, exc.details() or "", None)
    return "OK", check_grpc(case, "OK", "", response)


# -- the command --------------------------------------------------------------------------


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8080", help="the server to fuzz")
    parser.add_argument("--model", default=None, help="served model name; default: the first of /v1/models")
    parser.add_argument("--requests", type=int, default=1000, help="fuzzed requests to send")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the generator: the same seed sends the same requests"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per-request timeout")
    parser.add_argument(
        "--grpc",
        default=None,
        metavar="HOST:PORT",
        help="also fuzz gRPC ModelInfer on this address (a server with --enable_grpc)",
    )
    parser.add_argument(
        "--grpc-requests", type=int, default=None, help="gRPC calls to send (default: a quarter of --requests)"
    )


async def fuzz(
    base_url: str,
    model: str,
    requests: int,
    seed: int,
    concurrency: int,
    timeout: float,
    grpc_target: str | None = None,
    grpc_requests: int = 0,
) -> FuzzReport:
    """Send ``requests`` cases from ``seed`` (and ``grpc_requests`` ModelInfer calls to
    ``grpc_target``) and collect statuses and problems; a valid request must be served after."""
    rng, grpc_rng = random.Random(seed), random.Random(f"grpc {seed}")  # HTTP cases of a seed stay those it always gave
    cases = [("http", make_case(rng, model)) for _ in range(requests)]
    if grpc_target is not None:
        cases += [("grpc", make_grpc_case(grpc_rng, model)) for _ in range(grpc_requests)]
        grpc_rng.shuffle(cases)
    pending = iter(cases)
    report = FuzzReport()
    limits = httpx.Limits(max_connections=concurrency)
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client,
        _grpc_channel(grpc_target) as channel,
    ):

        async def worker() -> None:
            for route, case in pending:
                if route == "grpc":
                    status, problem = await send_grpc(channel, case, timeout)
                    status, where = f"grpc {status}", f"gRPC ModelInfer [{case.what}]"
                else:
                    status, problem = await send(client, case)
                    where = f"{case.method} {case.path[:80]} [{case.what}]"
                report.statuses[status] += 1
                if problem:
                    report.problems.append(f"{where}: {problem}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        after = FuzzCase(
            "POST",
            "/v1/completions",
            encode({"model": model, "prompt": "still serving?", "max_tokens": 2}),
            True,
            "after",
        )
        status, problem = await send(client, after)
        if status != 200:
            report.problems.append(f"the request after fuzzing got HTTP {status}: {problem}")
        if channel is not None:
            status, problem = await send_grpc(
                channel, GrpcCase(valid_grpc_request(model).SerializeToString(), True, "after"), timeout
            )
            if status != "OK":
                report.problems.append(f"the gRPC call after fuzzing got {status}: {problem}")
    return report


@contextlib.asynccontextmanager
async def _grpc_channel(target: str | None):
    if target is None:
        yield None
        return
    async with grpc.aio.insecure_channel(target) as channel:
        yield channel


def main(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the report
    model = args.model or httpx.get(args.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
    started = time.perf_counter()
    grpc_requests = args.requests // 4 if args.grpc_requests is None else args.grpc_requests
    report = asyncio.run(
        fuzz(args.base_url, model, args.requests, args.seed, args.concurrency, args.timeout_s, args.grpc, grpc_requests)
    )
    elapsed = time.perf_counter() - started
    over_grpc = f" and {grpc_requests} gRPC calls to {args.grpc}" if args.grpc else ""
    print(f"fuzzed {args.requests} requests (seed {args.seed}) against {args.base_url}{over_grpc} in {elapsed:.1f}s")
    print(
        "status counts: "
        + ", ".join(
            f"{status}: {count}" for status, count in sorted(report.statuses.items(), key=lambda kv: str(kv[0]))
        )
    )
    http_5xx = sum(c for s, c in report.statuses.items() if isinstance(s, int) and s >= 500)
    grpc_bad = sum(
        c for s, c in report.statuses.items() if isinstance(s, str) and s.removeprefix("grpc ") not in GRPC_ALLOWED
    )
    grpc_part = f", gRPC INTERNAL/UNKNOWN/other: {grpc_bad}" if args.grpc else ""
    print(
        f"5xx: {http_5xx}, dropped connections: {report.statuses.get(0, 0)}{grpc_part}, "
        f"problems: {len(report.problems)}"
    )
    for problem in report.problems[:20]:
        print("  " + problem)
    return 1 if report.problems else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_args(parser)
    sys.exit(main(parser.parse_args()))
