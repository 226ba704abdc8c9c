"""KServe v2 over gRPC: the Open Inference Protocol's ``GRPCInferenceService`` on ``--grpc_port``.

The stubs in ``server/proto`` are generated from the protocol's ``grpc_predict_v2.proto`` and
committed (``make grpc-stubs`` regenerates them). Each RPC turns its message into what the REST
route takes and calls the same function (``kserve.v2_infer``, ``kserve.v2_metadata``), so
validation and errors are shared; an exception maps to an HTTP status through ``http_error``
(the one mapping) and from there to a gRPC status code. The server runs in uvicorn's event
loop, started and stopped with the app's lifespan, so it serves the same engine.
"""

from __future__ import annotations

import logging
import struct
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from stepserve.errors import InvalidRequestError
from stepserve.server import kserve
from stepserve.server.access import AccessConfig, GrpcConfig, api_key_ok
from stepserve.server.app import http_error
from stepserve.server.context import ServingContext
from stepserve.server.proto import grpc_predict_v2_pb2 as pb
from stepserve.server.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from stepserve.server.schemas import KServeV2Request, validate

log = logging.getLogger("stepserve.server")

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Tensor parameters that describe raw_input_contents' encoding (KServe's client sends
# binary_data_size with it), consumed here when decoding it.
_RAW_ONLY = ("binary_data_size",)
_PROBES = frozenset({"ServerLive", "ServerReady", "ModelReady"})  # open without the API key, as the HTTP probes


# -- messages <-> the REST route's shapes ------------------------------------------------


def _param_value(param: pb.InferParameter):
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)


def _decode_raw_bytes(raw: bytes, name: str) -> list[str]:
    """BYTES elements of ``raw_input_contents``: each a 4-byte little-endian length, then the bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidRequestError(f"raw contents of {name} end inside a length prefix", "inputs")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidRequestError(f"raw contents of {name} end inside an element", "inputs")
        items.append(raw[offset : offset + length])
        offset += length
    return items


def _text(item: bytes, name: str) -> str:
    try:
        return item.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{name} holds bytes that are not UTF-8 text", "inputs") from None


def _tensor_data(tensor, raw: bytes | None) -> list:
    """The tensor's elements as the REST route's JSON would carry them."""
    if raw is not None:
        return (
            [_text(b, tensor.name) for b in _decode_raw_bytes(raw, tensor.name)]
            if tensor.datatype == "BYTES"
            else [raw.hex()]
        )
    contents = tensor.contents
    if tensor.datatype == "BYTES":
        return [_text(b, tensor.name) for b in contents.bytes_contents]
    for kind in ("bool", "int", "int64", "uint", "uint64", "fp32", "fp64"):
        values = list(getattr(contents, f"{kind}_contents"))
        if values:
            return values
    return []


def rest_request(request: pb.ModelInferRequest) -> KServeV2Request:
    """The REST body this request means, validated by the REST route's own model."""
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise InvalidRequestError(
            f"raw_input_contents has {len(raws)} entries for {len(request.inputs)} inputs", "inputs"
        )
    inputs = [
        {
            "name": t.name,
            "shape": list(t.shape),
            "datatype": t.datatype,
            "data": _tensor_data(t, raws[i] if raws else None),
        }
        | _parameters(t, drop=_RAW_ONLY if raws else ())
        for i, t in enumerate(request.inputs)
    ]
    body = {"inputs": inputs} | _parameters(request)
    if request.id:
        body["id"] = request.id
    if request.outputs:
        body["outputs"] = [{"name": o.name} | _parameters(o) for o in request.outputs]
    return validate(KServeV2Request, body)


def _parameters(message, drop: tuple[str, ...] = ()) -> dict:
    """``{"parameters": {...}}`` as JSON would carry them, or nothing when there are none."""
    parameters = {k: _param_value(v) for k, v in message.parameters.items() if k not in drop}
    return {"parameters": parameters} if parameters else {}


# The REST body's tensor datatypes and the ``InferTensorContents`` field carrying each (the
# protocol's table); BYTES elements are UTF-8 text here (texts, or JSON per instance).
_CONTENTS = {
    "BYTES": "bytes_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT64": "int64_contents",
    "INT32": "int_contents",
    "BOOL": "bool_contents",
}


def _contents(tensor: dict) -> pb.InferTensorContents:
    data = tensor["data"]
    if tensor["datatype"] == "BYTES":
        data = [text.encode("utf-8") for text in data]
    return pb.InferTensorContents(**{_CONTENTS[tensor["datatype"]]: data})


def infer_response(body: dict) -> pb.ModelInferResponse:
    """The REST route's answer as a message: every output tensor (generated text, embeddings,
    class indices, offsets...) in the contents field its datatype names."""
    outputs = [
        pb.ModelInferResponse.InferOutputTensor(
            name=t["name"], datatype=t["datatype"], shape=t["shape"], contents=_contents(t)
        )
        for t in body["outputs"]
    ]
    return pb.ModelInferResponse(model_name=body["model_name"], id=body.get("id", ""), outputs=outputs)


def _metadata_response(body: dict) -> pb.ModelMetadataResponse:
    def tensors(items):
        return [
            pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"])
            for t in items
        ]

    return pb.ModelMetadataResponse(
        name=body["name"],
        versions=body["versions"],
        platform=body["platform"],
        inputs=tensors(body["inputs"]),
        outputs=tensors(body["outputs"]),
    )


# -- the service --------------------------------------------------------------------------


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, app_state, api_key: str | None) -> None:
        self.state = app_state  # the FastAPI app's state: ctx (ServingContext) and client
        self.api_key = api_key

    @property
    def ctx(self) -> ServingContext:
        return self.state.ctx

    async def _fail(self, context, exc: Exception):
        error = http_error(exc)
        await context.abort(STATUS_CODES.get(error.status, grpc.StatusCode.UNKNOWN), error.message)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=getattr(self.state.client, "is_live", True))

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ctx.engine.is_ready)

    async def ModelReady(self, request, context):
        try:
            self.ctx.check_model(request.name)
        except Exception as exc:
            await self._fail(context, exc)
        return pb.ModelReadyResponse(ready=self.ctx.engine.is_ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="stepserve", version="0.1.0", extensions=[])

    async def ModelMetadata(self, request, context):
        try:
            body = kserve.v2_metadata(self.ctx, request.name)
        except Exception as exc:
            await self._fail(context, exc)
        return _metadata_response(body)

    async def ModelInfer(self, request, context):
        try:
            body = await kserve.v2_infer(self.ctx, request.model_name, rest_request(request))
        except Exception as exc:
            await self._fail(context, exc)
        return infer_response(body)


@dataclass(frozen=True)
class _Malformed:
    reason: str  # why the bytes are not the RPC's message


class _MalformedInterceptor(grpc.aio.ServerInterceptor):
    """INVALID_ARGUMENT for bytes that do not parse as the RPC's message (a cut message, a
    string field that is not UTF-8); grpcio itself answers those UNKNOWN, a server error."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        parse, behaviour = handler.request_deserializer, handler.unary_unary

        def deserialize(data: bytes):
            try:
                return parse(data)
            except DecodeError as exc:
                return _Malformed(str(exc))

        async def guarded(request, context):
            if isinstance(request, _Malformed):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid protobuf message: {request.reason}"
                )
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=deserialize, response_serializer=handler.response_serializer
        )


class _ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without ``authorization: Bearer KEY`` metadata, except on the probes."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method.rsplit("/", 1)[-1] in _PROBES:
            return handler
        authorization = dict(details.invocation_metadata or ()).get("authorization")
        if api_key_ok(self.api_key, authorization):
            return handler

        async def deny(request, context):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "Incorrect or missing API key: send 'authorization: Bearer KEY' metadata",
            )

        return grpc.unary_unary_rpc_method_handler(
            deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


async def start_grpc(app_state, host: str, config: GrpcConfig, access: AccessConfig) -> grpc.aio.Server:
    # The last interceptor is the innermost: the API key's denial also gets the tolerant parser.
    interceptors = ([_ApiKeyInterceptor(access.api_key)] if access.api_key is not None else []) + [
        _MalformedInterceptor()
    ]
    server = grpc.aio.server(
        interceptors=interceptors, options=[("grpc.max_receive_message_length", access.max_request_body_bytes)]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(app_state, access.api_key), server)
    address = f"{host}:{config.grpc_port}"
    if access.tls:
        credentials = grpc.ssl_server_credentials(
            [(Path(access.ssl_keyfile).read_bytes(), Path(access.ssl_certfile).read_bytes())]
        )
        server.add_secure_port(address, credentials)
    else:
        server.add_insecure_port(address)
    await server.start()
    log.info("serving gRPC (GRPCInferenceService) on %s%s", address, " with TLS" if access.tls else "")
    return server


def with_grpc(app, host: str, config: GrpcConfig, access: AccessConfig, grace_s: float = 30.0):
    """Run the gRPC server inside the app's lifespan, once the engine is up; on shutdown,
    in-flight calls get ``grace_s`` to finish."""
    if not config.enable_grpc:
        return app
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a):
        async with inner(a) as state:
            server = await start_grpc(a.state, host, config, access)
            try:
                yield state
            finally:
                await server.stop(grace=grace_s)

    app.router.lifespan_context = lifespan
    return app
