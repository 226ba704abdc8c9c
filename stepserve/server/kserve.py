"""KServe's v1 and v2 (Open Inference Protocol) routes, on the completions pipeline.

Text goes in (v1 ``instances``, v2 a BYTES ``text_input`` tensor) and text comes out (v1
``predictions``, v2 a BYTES ``text_output`` tensor); ``parameters`` carry the same fields as
``/v1/completions`` (and Hugging Face's spellings of four of them) with the same validation and
the same ``max_tokens`` default. ``logprobs`` adds a v1 ``logprobs`` field or a v2 ``logprobs``
output, ``echo`` puts the prompt before the text, ``stream=true`` is refused: nothing is dropped.
"""

from __future__ import annotations

import json
import math

from stepserve.errors import InvalidRequestError
from stepserve.server import kserve_tasks, openai_tasks
from stepserve.server.context import ServingContext
from stepserve.server.fields import hf_parameters, instance_text, requested_outputs
from stepserve.server.schemas import CompletionRequest, KServeV1Request, KServeV2Request, KServeV2Tensor, validate

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"
LOGPROBS_OUTPUT = "logprobs"  # per completion, the /v1/completions logprobs object as a JSON string
OUTPUTS = (TEXT_OUTPUT, LOGPROBS_OUTPUT)
_NO_STREAM = "streaming is not offered on KServe v1/v2; use /v1/completions with stream=true"
_ELSEWHERE = {  # CompletionRequest fields that have another place (or none) on these routes
    "prompt": "the prompts are the instances (v1) or the text_input tensor (v2)",
    "stream_options": _NO_STREAM,
    "prompt_logprobs": "prompt logprobs are answered on /v1/completions only",
}


def completion_request(
    ctx: ServingContext, prompts: list[str], parameters: dict, model: str | None = None
) -> CompletionRequest:
    """The ``/v1/completions`` request these prompts and ``parameters`` stand for; 400 for a
    field the parameters cannot carry or that no request knows."""
    fields = hf_parameters(parameters)
    for name, why in _ELSEWHERE.items():
        if name in fields:
            raise InvalidRequestError(f"parameters.{name} is not accepted here: {why}", f"parameters.{name}")
    if fields.get("stream") is True:
        raise InvalidRequestError(f"parameters.stream=true is not accepted here: {_NO_STREAM}", "parameters.stream")
    body = {**fields, "prompt": prompts} | ({"model": model} if model is not None else {})  # an adapter's name
    return validate(CompletionRequest, body, ctx.unknown, "parameters.")


async def _choices(ctx: ServingContext, req: CompletionRequest) -> list[dict]:
    """One completions choice per completion, in order (``n`` per prompt)."""
    body = await openai_tasks.any_completion(ctx, req)
    return body["choices"]


async def v1_predict(ctx: ServingContext, name: str, req: KServeV1Request) -> dict:
    ctx.check_model(name)
    if ctx.tasks is not None and ctx.tasks.handles_kserve:
        return await kserve_tasks.v1_predict(ctx.tasks, ctx, req)
    if not req.instances:
        raise InvalidRequestError("instances must not be empty", "instances")
    prompts = [instance_text(ctx, i, x) for i, x in enumerate(req.instances)]
    creq = completion_request(ctx, prompts, req.parameters, name)
    choices = await _choices(ctx, creq)
    body = {"predictions": [c["text"] for c in choices]}
    return body | ({"logprobs": [c["logprobs"] for c in choices]} if creq.logprobs is not None else {})


# -- v2 -----------------------------------------------------------------------------------


def _text_input(ctx: ServingContext, req: KServeV2Request) -> list[str]:
    """The texts of the one input, checked: name, datatype, shape against the data."""
    names = [t.name for t in req.inputs]
    for i, tensor_name in enumerate(names):
        if tensor_name != TEXT_INPUT:
            raise InvalidRequestError(
                f"inputs[{i}].name={tensor_name!r}: this model takes one input, {TEXT_INPUT} (BYTES, shape [-1])",
                "inputs",
            )
    if len(names) != 1:
        raise InvalidRequestError(
            f"inputs must hold exactly one tensor named {TEXT_INPUT!r}, got {len(names)}", "inputs"
        )
    tensor = req.inputs[0]
    _check_tensor_parameters(ctx, tensor)
    if tensor.datatype != "BYTES":
        raise InvalidRequestError(f"{TEXT_INPUT} must have datatype BYTES, got {tensor.datatype}", "inputs")
    data = _flatten(tensor.data)
    if any(d < 0 for d in tensor.shape) or math.prod(tensor.shape) != len(data):
        raise InvalidRequestError(f"{TEXT_INPUT} has shape {tensor.shape} but {len(data)} elements of data", "inputs")
    if not data or not all(isinstance(x, str) for x in data):
        raise InvalidRequestError(f"{TEXT_INPUT} data must be a non-empty list of strings", "inputs")
    return data


def _check_tensor_parameters(ctx: ServingContext, tensor: KServeV2Tensor) -> None:
    if "binary_data_size" in tensor.parameters:
        raise InvalidRequestError(
            f"{TEXT_INPUT}: binary tensor data is not supported; send the texts in 'data' (binary_data=False)", "inputs"
        )
    content_type = tensor.parameters.get("content_type", "str")
    if content_type not in ("str", "bytes"):
        raise InvalidRequestError(f"{TEXT_INPUT}: content_type={content_type!r} is not text; use 'str'", "inputs")
    ctx.unknown.check([f"inputs[0].parameters.{k}" for k in tensor.parameters if k != "content_type"])


def _flatten(data: list) -> list:
    out = []
    for item in data:
        out.extend(_flatten(item) if isinstance(item, list) else [item])
    return out


def _wanted_outputs(ctx: ServingContext, req: KServeV2Request, parameters: dict) -> list[str]:
    """The output names to return: those the request lists (each one we can produce), else all
    that its parameters ask for."""
    if req.outputs is None:
        return [TEXT_OUTPUT] + ([LOGPROBS_OUTPUT] if parameters.get("logprobs") is not None else [])
    return requested_outputs(ctx, req, list(OUTPUTS))


def v2_completion(
    ctx: ServingContext, req: KServeV2Request, model: str | None = None
) -> tuple[CompletionRequest, list[str]]:
    """The completions request a v2 request stands for, and the output names to answer with."""
    texts = _text_input(ctx, req)
    # binary_data_output (KServe's client) asks for binary outputs: answered in JSON, which it reads too
    parameters = {k: v for k, v in req.parameters.items() if k != "binary_data_output"}
    wanted = _wanted_outputs(ctx, req, parameters)
    if LOGPROBS_OUTPUT in wanted and parameters.get("logprobs") is None:
        parameters["logprobs"] = 0  # the chosen tokens' logprobs, no alternatives
    return completion_request(ctx, texts, parameters, model), wanted


async def v2_infer(ctx: ServingContext, name: str, req: KServeV2Request) -> dict:
    ctx.check_model(name)
    if ctx.tasks is not None and ctx.tasks.handles_kserve:
        return await kserve_tasks.v2_infer(ctx.tasks, ctx, req)
    ctx.check_model(req.model_name)
    creq, wanted = v2_completion(ctx, req, name)
    choices = await _choices(ctx, creq)
    tensors = {
        TEXT_OUTPUT: [c["text"] for c in choices],
        LOGPROBS_OUTPUT: [json.dumps(c["logprobs"]) for c in choices],
    }
    outputs = [{"name": n, "datatype": "BYTES", "shape": [len(choices)], "data": tensors[n]} for n in wanted]
    body = {"model_name": ctx.model_name, "outputs": outputs}
    return body | ({"id": req.id} if req.id is not None else {})


def v2_metadata(ctx: ServingContext, name: str) -> dict:
    ctx.check_model(name)
    if ctx.tasks is not None and ctx.tasks.handles_kserve:
        return kserve_tasks.v2_metadata(ctx.tasks, ctx.model_name)
    return {
        "name": ctx.model_name,
        "versions": [],
        "platform": "stepserve",
        "inputs": [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in OUTPUTS],
    }
