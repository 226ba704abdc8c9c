"""KServe v1 ``:predict`` and v2 ``infer`` for the encoder tasks, with the outputs KServe's
Hugging Face server gives (huggingfaceserver/encoder_model.py): a class index, or
``{class: probability}`` (4 decimals) with ``--return_probabilities``, or ``{class: logit}`` with
``--return_raw_logits``; per-token classes (and ``offset_mapping``); the filled-in tokens; the
embedding vectors. v2 answers with KServe's ``output-0`` tensor.

Where this differs from KServe: a token_classification instance answers for its own tokens
only (KServe pads every instance to the longest of the request and answers for the padding
too); inputs longer than the model's maximum are a 400 unless ``truncate_prompt_tokens`` is
set (KServe truncates silently)."""

from __future__ import annotations

import json

import numpy as np

from stepserve.errors import InvalidRequestError
from stepserve.server.fields import instance_text, requested_outputs
from stepserve.server.schemas import KServeV1Request, KServeV2Request
from stepserve.tasks import task as T
from stepserve.tasks.inputs import Encoded, resolve_truncation
from stepserve.tasks.serving import TaskServing, new_id

OUTPUT = "output-0"
OFFSETS = "offset_mapping"
_PARAMETERS = ("truncate_prompt_tokens",)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _as_dicts(rows: np.ndarray, probabilities: bool, as_text: bool = False) -> list[dict]:
    """KServe's {index: value} per row: probabilities to 4 decimals (as text for fill_mask), or raw logits."""
    values = _softmax(rows) if probabilities else rows
    if probabilities and as_text:
        return [{j: f"{v:.4f}" for j, v in enumerate(row)} for row in values]
    if probabilities:
        return [{j: float(f"{v:.4f}") for j, v in enumerate(row)} for row in values]
    return [{j: float(v) for j, v in enumerate(row)} for row in values]


class _Formatter:
    """One task's KServe prediction per instance, from the core's output values."""

    def __init__(self, ts: TaskServing) -> None:
        self.ts = ts
        flags = ts.spec.flags
        self.dicts = flags.return_probabilities or flags.return_raw_logits
        self.probabilities = flags.return_probabilities

    def __call__(self, values: np.ndarray):
        return getattr(self, self.ts.task)(values)

    def text_embedding(self, values: np.ndarray) -> list[float]:
        return self.ts.embedding(values).tolist()

    def sequence_classification(self, values: np.ndarray):
        return _as_dicts(values[None], self.probabilities)[0] if self.dicts else int(values.argmax())

    def token_classification(self, values: np.ndarray):
        return _as_dicts(values, self.probabilities) if self.dicts else [values.argmax(axis=-1).tolist()]

    def fill_mask(self, values: np.ndarray):
        if self.dicts:
            return [[{j: v} for j, v in row.items()] for row in _as_dicts(values, self.probabilities, as_text=True)]
        return self.ts.tokens.decode(values.argmax(axis=-1).tolist(), skip_special_tokens=False)


def _check_parameters(ctx, task: str, parameters: dict) -> int | None:
    """``truncate_prompt_tokens``; any other parameter is unknown here (a 400, or ignored with
    --allow-unknown-fields)."""
    unknown = [f"parameters.{key}" for key in parameters if key not in _PARAMETERS]
    if unknown and not ctx.unknown.allow:
        raise InvalidRequestError(
            f"{unknown[0]} is not supported for {task}; supported: {', '.join(_PARAMETERS)}", unknown[0]
        )
    ctx.unknown.check(unknown)
    value = parameters.get("truncate_prompt_tokens")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidRequestError(
            f"parameters.truncate_prompt_tokens must be an integer, got {value!r}", "parameters.truncate_prompt_tokens"
        )
    return value


def _mask_positions(ts: TaskServing, encoded: list[Encoded], param: str) -> list[tuple[int, ...]]:
    mask = ts.spec.mask_token_id
    positions = [tuple(i for i, t in enumerate(e.token_ids) if t == mask) for e in encoded]
    for i, p in enumerate(positions):
        if not p:
            raise InvalidRequestError(f"{param}[{i}] has no mask token ({ts.tokens.tokenizer.mask_token})", param)
    return positions


async def _predict(ts: TaskServing, ctx, texts: list[str], parameters: dict, param: str) -> tuple[list, list[Encoded]]:
    """The predictions for ``texts`` and their encodings (for offsets)."""
    truncate = resolve_truncation(_check_parameters(ctx, ts.task, parameters), ts.spec.max_model_len)
    offsets = ts.task == T.TOKEN_CLASSIFICATION and ts.spec.flags.return_offsets_mapping
    encoded = [ts.tokens.text(t, f"{param}[{i}]", param, truncate, offsets=offsets) for i, t in enumerate(texts)]
    fields = {"positions": _mask_positions(ts, encoded, param)} if ts.task == T.FILL_MASK else {}
    _, outputs = await ts.run("predict", encoded, **fields)
    format_ = _Formatter(ts)
    return [format_(o) for o in outputs], encoded


def _offsets_tensor(encoded: list[Encoded]) -> dict:
    """[n, longest, 2] INT64, shorter rows padded with (0, 0) as a padded tokenizer batch gives."""
    longest = max(len(e.offsets) for e in encoded)
    data = np.zeros((len(encoded), longest, 2), dtype=np.int64)
    for i, e in enumerate(encoded):
        data[i, : len(e.offsets)] = e.offsets
    return {"name": OFFSETS, "datatype": "INT64", "shape": list(data.shape), "data": data.flatten().tolist()}


def _wants_offsets(ts: TaskServing) -> bool:
    return ts.task == T.TOKEN_CLASSIFICATION and ts.spec.flags.return_offsets_mapping


async def v1_predict(ts: TaskServing, ctx, req: KServeV1Request) -> dict:
    if not req.instances:
        raise InvalidRequestError("instances must not be empty", "instances")
    texts = [instance_text(ctx, i, x) for i, x in enumerate(req.instances)]
    predictions, encoded = await _predict(ts, ctx, texts, req.parameters, "instances")
    body = {"predictions": predictions}
    return body | ({"outputs": [_offsets_tensor(encoded)]} if _wants_offsets(ts) else {})


def _v2_texts(ctx, req: KServeV2Request) -> list[str]:
    """KServe's encoder model reads one input tensor, whatever its name: BYTES, strings, its
    shape matching its data."""
    if len(req.inputs) != 1:
        raise InvalidRequestError(
            f"inputs must hold exactly one BYTES tensor of texts, got {len(req.inputs)}", "inputs"
        )
    tensor = req.inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidRequestError(
            f"inputs[0] ({tensor.name}) must have datatype BYTES, got {tensor.datatype}", "inputs"
        )
    data = _flatten(tensor.data)
    if not data or not all(isinstance(x, str) for x in data):
        raise InvalidRequestError(f"inputs[0] ({tensor.name}) data must be a non-empty list of strings", "inputs")
    if int(np.prod(tensor.shape)) != len(data) or any(d < 0 for d in tensor.shape):
        raise InvalidRequestError(
            f"inputs[0] ({tensor.name}) has shape {tensor.shape} but {len(data)} elements", "inputs"
        )
    ctx.unknown.check([f"inputs[0].parameters.{k}" for k in tensor.parameters if k != "content_type"])
    return data


def _wanted(ctx, req: KServeV2Request, produced: list[dict]) -> list[dict]:
    """The outputs the request lists (each one this task produces), else all."""
    if req.outputs is None:
        return produced
    by_name = {t["name"]: t for t in produced}
    return [by_name[name] for name in requested_outputs(ctx, req, list(by_name))]


def _flatten(data: list) -> list:
    out = []
    for item in data:
        out.extend(_flatten(item) if isinstance(item, list) else [item])
    return out


def _output_tensor(ts: TaskServing, predictions: list) -> dict:
    """Numbers as a numeric tensor; strings and nested or keyed values as BYTES (JSON per instance)."""
    n = len(predictions)
    if ts.task == T.EMBEDDING:
        data = np.asarray(predictions, dtype=np.float32)
        return {"name": OUTPUT, "datatype": "FP32", "shape": list(data.shape), "data": data.flatten().tolist()}
    if all(isinstance(p, int) for p in predictions):
        return {"name": OUTPUT, "datatype": "INT64", "shape": [n], "data": predictions}
    texts = [p if isinstance(p, str) else json.dumps(p) for p in predictions]
    return {"name": OUTPUT, "datatype": "BYTES", "shape": [n], "data": texts}


async def v2_infer(ts: TaskServing, ctx, req: KServeV2Request) -> dict:
    ctx.check_model(req.model_name, adapters=False)
    parameters = {
        k: v for k, v in req.parameters.items() if k != "binary_data_output"
    }  # answered in JSON, which KServe's client reads too
    predictions, encoded = await _predict(ts, ctx, _v2_texts(ctx, req), parameters, "inputs")
    outputs = [_output_tensor(ts, predictions)] + ([_offsets_tensor(encoded)] if _wants_offsets(ts) else [])
    return {"model_name": ctx.model_name, "id": req.id or new_id("infer"), "outputs": _wanted(ctx, req, outputs)}


def _output_datatype(ts: TaskServing) -> str:
    """What ``_output_tensor`` answers with for this task and these flags."""
    if ts.task == T.EMBEDDING:
        return "FP32"
    if ts.task == T.SEQUENCE_CLASSIFICATION and not _Formatter(ts).dicts:
        return "INT64"
    return "BYTES"


def v2_metadata(ts: TaskServing, model_name: str) -> dict:
    shape = [-1, ts.spec.hidden_size] if ts.task == T.EMBEDDING else [-1]
    outputs = [{"name": OUTPUT, "datatype": _output_datatype(ts), "shape": shape}]
    if _wants_offsets(ts):
        outputs.append({"name": OFFSETS, "datatype": "INT64", "shape": [-1, -1, 2]})
    inputs = [{"name": "input-0", "datatype": "BYTES", "shape": [-1]}]
    return {
        "name": model_name,
        "versions": [],
        "platform": "stepserve",
        "task": ts.task,
        "inputs": inputs,
        "outputs": outputs,
    }
