"""KServe's v1 and v2 (Open Inference Protocol) routes, on the completions pipeline.

Text goes in (v1 ``instances``, v2 a BYTES ``text_input`` tensor) and text comes out (v1
``predictions``, v2 a BYTES ``text_output`` tensor); ``parameters`` carry the same sampling
fields as ``/v1/completions`` with the same validation and the same ``max_tokens`` default.
"""

from __future__ import annotations

from stepserve.errors import InvalidRequestError
from stepserve.server import openai
from stepserve.server.context import ServingContext
from stepserve.server.schemas import CompletionRequest, KServeV1Request, KServeV2Request, validate

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"


async def _generate_texts(ctx: ServingContext, prompts: list[str], parameters: dict) -> list[str]:
    """One text per completion, in order (``n`` per prompt)."""
    fields = {k: v for k, v in parameters.items() if k not in ("prompt", "stream", "stream_options", "echo", "model")}
    req = validate(CompletionRequest, {**fields, "prompt": prompts})
    body = await openai.complete(ctx, req)
    return [choice["text"] for choice in body["choices"]]


def _instance_text(index: int, instance: str | dict) -> str:
    if isinstance(instance, str):
        return instance
    for key in ("text", "prompt"):
        if isinstance(instance.get(key), str):
            return instance[key]
    raise InvalidRequestError(f"instances[{index}] must be a string or an object with a 'text' string", "instances")


async def v1_predict(ctx: ServingContext, name: str, req: KServeV1Request) -> dict:
    ctx.check_model(name)
    if ctx.tasks is not None and ctx.tasks.handles_kserve:
        from stepserve.tasks import kserve as task_kserve

        return await task_kserve.v1_predict(ctx.tasks, req)
    if not req.instances:
        raise InvalidRequestError("instances must not be empty", "instances")
    prompts = [_instance_text(i, x) for i, x in enumerate(req.instances)]
    return {"predictions": await _generate_texts(ctx, prompts, req.parameters)}


def _text_input(req: KServeV2Request) -> list[str]:
    tensors = [t for t in req.inputs if t.name == TEXT_INPUT]
    if not tensors:
        raise InvalidRequestError(f"inputs must contain a BYTES tensor named {TEXT_INPUT!r}", "inputs")
    tensor = tensors[0]
    if tensor.datatype != "BYTES":
        raise InvalidRequestError(f"{TEXT_INPUT} must have datatype BYTES, got {tensor.datatype}", "inputs")
    data = _flatten(tensor.data)
    if not data or not all(isinstance(x, str) for x in data):
        raise InvalidRequestError(f"{TEXT_INPUT} data must be a non-empty list of strings", "inputs")
    return data


def _flatten(data: list) -> list:
    out = []
    for item in data:
        out.extend(_flatten(item) if isinstance(item, list) else [item])
    return out


async def v2_infer(ctx: ServingContext, name: str, req: KServeV2Request) -> dict:
    ctx.check_model(name)
    if ctx.tasks is not None and ctx.tasks.handles_kserve:
        from stepserve.tasks import kserve as task_kserve

        return await task_kserve.v2_infer(ctx.tasks, ctx.model_name, req)
    texts = await _generate_texts(ctx, _text_input(req), req.parameters)
    output = {"name": TEXT_OUTPUT, "datatype": "BYTES", "shape": [len(texts)], "data": texts}
    body = {"model_name": ctx.model_name, "outputs": [output]}
    return body | ({"id": req.id} if req.id is not None else {})


def v2_metadata(ctx: ServingContext, name: str) -> dict:
    ctx.check_model(name)
    if ctx.tasks is not None and ctx.tasks.handles_kserve:
        from stepserve.tasks import kserve as task_kserve

        return task_kserve.v2_metadata(ctx.tasks, ctx.model_name)
    return {
        "name": ctx.model_name,
        "versions": [],
        "platform": "stepserve",
        "inputs": [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": TEXT_OUTPUT, "datatype": "BYTES", "shape": [-1]}],
    }
