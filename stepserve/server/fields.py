"""Request fields the server does not know: refused with a 400 naming them (OpenAI's behaviour),
or with ``--allow-unknown-fields`` ignored and logged once per name (vLLM's).

What is known is what the request models declare, so a field added to a model is known at once.
KServe ``parameters`` also accept the Hugging Face spellings of a few fields (``hf_parameters``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from pydantic import BaseModel

from stepserve.errors import InvalidRequestError

log = logging.getLogger("stepserve.server")


def unknown_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Paths of the fields in ``model`` (and the models inside it) that no model declares."""
    out = [prefix + name for name in model.model_extra or {}]
    for name in type(model).model_fields:
        out += _nested(getattr(model, name), prefix + name)
    return out


def _nested(value: object, path: str) -> list[str]:
    if isinstance(value, BaseModel):
        return unknown_fields(value, path + ".")
    if isinstance(value, (list, tuple)):
        return [name for i, item in enumerate(value) for name in _nested(item, f"{path}[{i}]")]
    if isinstance(value, dict):
        return [
            name
            for key, item in value.items()
            if isinstance(item, BaseModel)
            for name in _nested(item, f"{path}.{key}")
        ]
    return []


@dataclass
class UnknownFieldPolicy:
    """Refuse unknown fields, or (``allow``) ignore them, logging each name once per process."""

    allow: bool = False  # --allow-unknown-fields
    logged: set[str] = field(default_factory=set)  # names already logged

    def check(self, names: list[str]) -> None:
        if not names:
            return
        if not self.allow:
            plural = "s" if len(names) > 1 else ""
            raise InvalidRequestError(
                f"Unrecognized request argument{plural} supplied: {', '.join(names)} "
                "(stepserve refuses fields it would otherwise ignore; "
                "start it with --allow-unknown-fields to ignore them)",
                names[0],
            )
        for name in {re.sub(r"\[\d+\]", "[]", n) for n in names} - self.logged:
            self.logged.add(name)
            log.warning("ignoring the unknown request field %r (--allow-unknown-fields; logged once)", name)


STRICT = UnknownFieldPolicy()  # the default where a caller names no policy: refuse


# -- KServe parameters in Hugging Face's spelling -----------------------------------------

_HF_RENAMES = {"max_new_tokens": "max_tokens", "stop_sequences": "stop", "return_full_text": "echo"}


def hf_parameters(parameters: dict) -> dict:
    """``parameters`` with Hugging Face's spellings as ours: ``max_new_tokens`` -> ``max_tokens``,
    ``stop_sequences`` -> ``stop``, ``return_full_text`` -> ``echo``, ``do_sample: false`` ->
    greedy (``temperature`` 0, as ``transformers`` ignores the temperature then)."""
    out = dict(parameters)
    for hf_name, name in _HF_RENAMES.items():
        if hf_name not in out:
            continue
        if name in out and out[name] != out[hf_name]:
            raise InvalidRequestError(
                f"parameters.{hf_name} and parameters.{name} are the same setting; give one", f"parameters.{hf_name}"
            )
        out[name] = out.pop(hf_name)
    if "do_sample" in out:
        do_sample = out.pop("do_sample")
        if not isinstance(do_sample, bool):
            raise InvalidRequestError(
                f"parameters.do_sample must be true or false, got {do_sample!r}", "parameters.do_sample"
            )
        if not do_sample:
            out["temperature"] = 0.0
    return out


# -- KServe's request fields, shared by every task -----------------------------------------


def instance_text(ctx, index: int, instance: str | dict) -> str:
    """A KServe v1 instance's text, on every task: a string, or an object with one 'text' (or 'prompt') string."""
    if isinstance(instance, str):
        return instance
    keys = [k for k in ("text", "prompt") if k in instance]
    if len(keys) != 1 or not isinstance(instance[keys[0]], str):
        raise InvalidRequestError(
            f"instances[{index}] must be a string or an object with one 'text' string", "instances"
        )
    ctx.unknown.check([f"instances[{index}].{k}" for k in instance if k != keys[0]])
    return instance[keys[0]]


def requested_outputs(ctx, req, available: list[str]) -> list[str]:
    """The output names a v2 request lists, each one this model can produce (a 400 naming the
    first it cannot). ``binary_data``, which KServe's client may send, is answered in JSON,
    which its client reads too."""
    names = []
    for i, output in enumerate(req.outputs):
        if output.name not in available:
            raise InvalidRequestError(
                f"outputs[{i}].name={output.name!r} cannot be produced; this model gives {', '.join(available)}",
                "outputs",
            )
        ctx.unknown.check([f"outputs[{i}].parameters.{k}" for k in output.parameters if k != "binary_data"])
        names.append(output.name)
    return names
