"""vLLM's command line on ``stepserve serve`` (docs/deployment.md, "vLLM's command line").

``vllm serve MODEL`` and vLLM's spelling of every flag both servers have are accepted, so a
KServe LLMInferenceService template runs stepserve by changing the image and the program name.
Flags with the same name are the config fields' own (``stepserve.config.add_dataclass_args``);
this module holds the rest, in one place: the spellings that differ, vLLM's names of values,
the flags that change nothing here, and the flags stepserve refuses by name (exit status 2)
instead of argparse's "unrecognized arguments" or, worse, ignoring them. Torch-free: the
parser is built before any engine.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from stepserve.config import ConfigError

log = logging.getLogger("stepserve.cli")

# vLLM's spellings where they differ from a config field's own, by field.
MODEL_ALIASES = {"quantization": "-q"}
CACHE_ALIASES = {"num_blocks": "--num-gpu-blocks-override"}
SERVER_ALIASES = {"http_port": "--port", "shutdown_grace_s": "--shutdown-timeout"}
REVISION_ALIAS = "--revision"  # of --model_revision (cli/engine_args.py)

# vLLM's names for values of flags both servers have -> stepserve's names.
VALUE_ALIASES: dict[str, dict[str, str | None]] = {
    "dtype": {"half": "float16", "float": "float32"},
    "kv_cache_dtype": {"fp8_e4m3": "fp8"},
    "load_format": {"safetensors": "auto"},
    "task": {
        "auto": None,
        "generate": "text_generation",
        "embed": "text_embedding",
        "classify": "sequence_classification",
    },
}

# vLLM flags that ask for what stepserve always does: accepted and logged at startup, never
# silently. flag -> (the values that ask for it, or None for a switch; why it changes nothing).
NO_OPS: dict[str, tuple[tuple[str, ...] | None, str]] = {
    "--trust-remote-code": (
        None,
        "stepserve runs its own implementation of each architecture and never code from a model's "
        "repository, so the same models load with it or without it",
    ),
    "--disable-log-requests": (None, "stepserve never logs prompts or parameters (one summary line per request)"),
    "--enable-chunked-prefill": (None, "stepserve always splits long prompts into --max-num-batched-tokens chunks"),
    "--disable-custom-all-reduce": (None, "tensor parallelism uses NCCL's (or gloo's) all-reduce only"),
    "--disable-cascade-attn": (None, "stepserve has no cascade attention"),
    "--distributed-executor-backend": (("mp",), "tensor-parallel ranks are always processes of one host"),
    "--scheduling-policy": (("fcfs",), "requests are always scheduled first come, first served"),
    "--max-logprobs": (("20",), "a request may ask for at most 20 logprobs per token (OpenAI's limit)"),
}

_REPLICAS = "one server is one engine: run more replicas behind a load balancer"
_TOKENIZER = "the tokenizer is the model directory's own"
_GRAPHS = "CUDA graphs and compiled kernels are stepserve's choice on a GPU; --enforce-eager turns them off"
_TEMPLATE = (
    "the chat template is the model's own (chat_template in tokenizer_config.json, or chat_template.jinja "
    "in the model directory): put a different template there"
)

# vLLM flags stepserve does not implement: refused by name, with why and what to do instead.
# (--task is not here: it is KServe's flag (tasks/config.py), and VALUE_ALIASES maps vLLM's values.)
REFUSED: dict[tuple[str, ...], str] = {
    ("--pipeline-parallel-size", "-pp"): "no pipeline parallelism; --tensor-parallel-size splits a model over one host",
    ("--data-parallel-size", "-dp"): _REPLICAS,
    ("--data-parallel-size-local",): _REPLICAS,
    ("--data-parallel-address",): _REPLICAS,
    ("--data-parallel-rpc-port",): _REPLICAS,
    ("--data-parallel-start-rank",): _REPLICAS,
    ("--data-parallel-backend",): _REPLICAS,
    ("--api-server-count",): "one HTTP front per server",
    ("--headless",): "every stepserve server has its HTTP front",
    ("--enable-expert-parallel",): "no expert parallelism: --tensor-parallel-size splits every expert",
    ("--kv-transfer-config",): "no KV cache transfer between servers (disaggregated prefill)",
    ("--swap-space",): "preempted requests are recomputed, never swapped to host memory",
    ("--cpu-offload-gb",): "weights stay on the device",
    ("--kv-cache-memory-bytes",): "size the KV cache with --gpu-memory-utilization or --num-blocks",
    ("--calculate-kv-scales",): "fp8 KV cache scales are fixed at load, never calculated from the data",
    ("--guided-decoding-backend",): "structured output has one engine, stepserve's own (docs/structured-output.md)",
    ("--structured-outputs-config",): "structured output has one engine, stepserve's own (docs/structured-output.md)",
    ("--limit-mm-per-prompt",): "text models only: no images, audio or video",
    ("--mm-processor-kwargs",): "text models only: no images, audio or video",
    ("--runner",): "the task comes from the architecture, or --task (KServe's names: docs/tasks.md)",
    ("--convert",): "the task comes from the architecture, or --task (KServe's names: docs/tasks.md)",
    ("--hf-overrides",): "the model's config.json is read as it is",
    ("--rope-scaling",): "RoPE scaling is the model's config.json's",
    ("--rope-theta",): "RoPE's theta is the model's config.json's",
    ("--override-generation-config",): "sampling defaults come from --generation-config (a directory or auto)",
    ("--model-impl",): "every architecture runs stepserve's own implementation",
    ("--code-revision",): "stepserve runs no code from model repositories",
    ("--tokenizer",): _TOKENIZER,
    ("--tokenizer-mode",): _TOKENIZER,
    ("--skip-tokenizer-init",): _TOKENIZER,
    ("--chat-template",): _TEMPLATE,
    ("--chat-template-content-format",): _TEMPLATE,
    ("--response-role",): "the reply's role is always assistant",
    ("--download-dir",): "downloads go to the Hugging Face cache: set HF_HOME or HF_HUB_CACHE",
    ("--compilation-config", "-O"): _GRAPHS,
    ("--cuda-graph-sizes",): _GRAPHS,
    ("--max-seq-len-to-capture",): _GRAPHS,
    ("--enable-sleep-mode",): "no sleep mode",
    ("--enable-log-requests",): "stepserve never logs prompts or parameters, only one summary line per request",
    ("--max-num-partial-prefills",): (
        "prefill chunks are bounded by --max-num-batched-tokens and --long-prefill-token-threshold only"
    ),
    ("--fully-sharded-loras",): (
        "under tensor parallelism an adapter is cut as its projection is (B's rows of a column-parallel "
        "one, A's columns of a row-parallel one); the fully sharded layout is not offered"
    ),
    ("--lora-dtype",): "adapters run in the model's dtype",
    ("--ssl-ca-certs",): "no client certificates (mutual TLS); --api-key guards the server",
    ("--ssl-cert-reqs",): "no client certificates (mutual TLS); --api-key guards the server",
    ("--allowed-methods",): "CORS allows every method and header for --allowed-origins",
    ("--allowed-headers",): "CORS allows every method and header for --allowed-origins",
    ("--allow-credentials",): "CORS allows credentials unless --allowed-origins has '*'",
    ("--middleware",): "no custom ASGI middleware",
    ("--disable-frontend-multiprocessing",): "--engine-in-process runs the engine core in a thread of the server",
    ("--enable-prompt-tokens-details",): "usage has no prompt_tokens_details",
    ("--enable-force-include-usage",): "streams carry usage when stream_options.include_usage asks",
    ("--return-tokens-as-token-ids",): "logprobs name tokens by their text",
    ("--tool-parser-plugin",): "tool-call parsers are built in: --tool-call-parser",
    ("--enable-request-id-headers",): "no X-Request-Id response header",
    ("--disable-fastapi-docs",): "the OpenAPI document and /docs are always served",
    ("--logits-processors",): "no custom logits processors",
    ("--worker-cls",): "no pluggable workers",
    ("--config",): "no YAML configuration file: pass the flags",
    ("--otlp-traces-endpoint",): "no OpenTelemetry tracing; metrics are at /metrics",
}


class _NoOp(argparse.Action):
    """A vLLM flag that changes nothing here: checked, then remembered for ``resolve`` to log."""

    def __init__(self, option_strings, dest, values: tuple[str, ...] | None, reason: str, **kwargs) -> None:
        super().__init__(option_strings, "vllm_no_ops", nargs=0 if values is None else None, default=None, **kwargs)
        self.accepted, self.reason = values, reason

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if self.accepted is not None and values not in self.accepted:
            parser.error(
                f"{option_string} {values} is not supported: {self.reason} ({option_string} {'|'.join(self.accepted)})"
            )
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), option_string])


class _Refused(argparse.Action):
    """A vLLM flag stepserve does not implement: an error naming it, exit status 2."""

    def __init__(self, option_strings, dest, reason: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is a vLLM flag stepserve does not implement: {self.reason}")


def add_vllm_args(parser: argparse.ArgumentParser) -> None:
    """The positional model, --served-model-name, the no-ops and the refusals. A flag here that
    stepserve comes to implement conflicts at once (argparse refuses a name given twice)."""
    parser.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="as vllm serve takes it: a directory, a .gguf file or a hub id ORG/NAME (as --model or --model_id)",
    )
    parser.add_argument(
        "--served-model-name",
        dest="served_model_name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="vLLM's spelling: the first name is --model_name, any further ones --model_aliases",
    )
    for flag, (values, reason) in NO_OPS.items():
        metavar = None if values is None else "|".join(values)
        parser.add_argument(
            flag, action=_NoOp, values=values, reason=reason, metavar=metavar, help=f"changes nothing: {reason}"
        )
    for names, reason in REFUSED.items():
        parser.add_argument(*names, action=_Refused, reason=reason)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with vLLM's spellings folded into stepserve's: the positional model, the served
    names and vLLM's names of values; the no-ops given are logged. A conflict is a ConfigError."""
    values = dict(vars(args))
    values.update(_model(values))
    values.update(_served_names(values))
    for name, aliases in VALUE_ALIASES.items():
        if isinstance(values.get(name), str) and values[name] in aliases:
            values[name] = aliases[values[name]]
    for flag in values.pop("vllm_no_ops", None) or ():
        log.info("%s changes nothing: %s", flag, NO_OPS[flag][1])
    return argparse.Namespace(**values)


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _model(values: dict) -> dict:
    """The positional model as --model (a path) or --model_id (an ORG/NAME that is no path)."""
    tag = values.pop("model_tag", None)
    if tag is None:
        return {}
    for flag, key in (("--model", "model"), ("--model_id", "model_id")):
        if values.get(key) not in (None, tag):
            raise ConfigError(f"the model is given twice: {tag!r} (the positional MODEL) and {flag} {values[key]!r}")
    if _HUB_ID.fullmatch(tag) and not Path(tag).expanduser().exists():
        return {"model_id": tag}
    return {"model": tag}


def _served_names(values: dict) -> dict:
    """--served-model-name's first name as --model_name, the others as --model_aliases."""
    names = values.pop("served_model_name", None)
    if not names:
        return {}
    first, *rest = dict.fromkeys(names)  # in order, without repeats
    if values.get("model_name") not in (None, first):
        raise ConfigError(f"--served-model-name {first!r} and --model_name {values['model_name']!r} disagree")
    aliases = values.get("model_aliases") or ()
    if rest and aliases and tuple(rest) != tuple(aliases):
        raise ConfigError(f"--served-model-name's further names {rest} and --model_aliases {list(aliases)} disagree")
    return {"model_name": first, "model_aliases": tuple(rest) or tuple(aliases)}
