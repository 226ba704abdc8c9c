"""Tokenizer, chat template and end-of-sequence ids, through transformers.

transformers' ``AutoTokenizer`` imports PyTorch (its module imports the model-config registry,
whose rotary utilities import torch when it is installed), and the HTTP front keeps PyTorch out
of its process (docs/architecture.md, "Processes"). So a process that has not imported PyTorch
loads its tokenizer in a short-lived child process, and the tokenizer comes back pickled: its
own classes import no PyTorch. A process that holds PyTorch already loads it directly, and so
does one whose tokenizer is transformers' generic fast class (``GENERIC_CLASSES`` in its
``tokenizer_config.json``: the embedded model's converted twin, and most saved by transformers 5),
which ``PreTrainedTokenizerFast`` loads without the registry and without PyTorch: the embedded
model's in 1.8 s in the front, against 6.9-9.8 s through a child that imports PyTorch for
AutoTokenizer (2-core AVX2 CPU), on every server start.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor

from stepserve.config import ConfigError
from stepserve.errors import InvalidRequestError
from stepserve.checkpoint.source import ModelSource

logging.getLogger("transformers").setLevel(logging.ERROR)


def load_tokenizer(source: ModelSource, **options):
    """The model's tokenizer (``options`` go to ``from_pretrained``, e.g. ``do_lower_case``)."""
    generic = _generic_fast(source)
    if generic or "torch" in sys.modules:
        return _load(source, options, generic)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        return child.submit(_load, source, options, generic).result()


# tokenizer_config.json's names of transformers' generic fast tokenizer (one class in transformers 5)
GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _generic_fast(source: ModelSource) -> bool:
    """Whether ``source`` is a folder whose tokenizer is transformers' generic fast class."""
    if source.gguf_file is not None or not (source.directory / "tokenizer.json").is_file():
        return False
    try:
        config = json.loads((source.directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("tokenizer_class") in GENERIC_CLASSES


def _load(source: ModelSource, options: dict, generic: bool):
    if source.gguf_file is not None:
        return _gguf_tokenizer(source)
    if generic:  # no registry: importing AutoTokenizer would import PyTorch
        from transformers import PreTrainedTokenizerFast as tokenizer_class
    else:
        from transformers import AutoTokenizer as tokenizer_class
    try:
        return tokenizer_class.from_pretrained(str(source.directory), **options)
    except (OSError, ValueError) as exc:  # one line at startup, whichever process loaded it
        raise ConfigError(f"the tokenizer in {source.directory} cannot be loaded: {exc}") from None


def _gguf_tokenizer(source: ModelSource):
    """A GGUF's tokenizer, built by transformers from the file's ``tokenizer.ggml.*`` metadata.

    ``AutoTokenizer`` first reads the file's model config to choose the tokenizer class, and
    transformers reads GGUF configs of the architectures it can load only: for Granite it raises
    "GGUF model with architecture granite is not supported yet", although the tokenizer (a
    ``gpt2`` byte-level BPE vocabulary with its merges) is one it builds for Llama 3 and Qwen
    files. Then the plain fast tokenizer class builds it from the same metadata, with the same
    builder (chosen by ``tokenizer.ggml.model``, the split by ``tokenizer.ggml.pre``), the
    control tokens as special tokens and the file's chat template.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory, name = str(source.directory), source.gguf_file
    try:
        return AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except ValueError as auto_error:
        try:
            return PreTrainedTokenizerFast.from_pretrained(directory, gguf_file=name)
        except ValueError as exc:
            reasons = "; ".join(dict.fromkeys([str(auto_error), str(exc)]))  # often the same reason twice
            raise ConfigError(
                f"the tokenizer of {name} cannot be read ({reasons}); use the safetensors checkpoint"
            ) from None


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def eos_token_ids(source: ModelSource, hf_config: dict, tokenizer) -> frozenset[int]:
    """Every id that ends a sequence: generation_config.json's list, the config's and the tokenizer's."""
    ids = _as_set(hf_config.get("eos_token_id")) | _as_set(tokenizer.eos_token_id)
    generation = source.directory / "generation_config.json"
    if source.gguf_file is None and generation.exists():
        ids |= _as_set(json.loads(generation.read_text()).get("eos_token_id"))
    return frozenset(ids)


# apply_chat_template's own arguments: a template variable of these names would change the call.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tokenize",
        "add_generation_prompt",
        "return_dict",
        "return_tensors",
        "chat_template",
        "continue_final_message",
    }
)


def check_template_kwargs(template_kwargs: dict | None) -> None:
    """Template variables are the template's business, except those that are the call's (a 400)."""
    clash = sorted(_RESERVED_TEMPLATE_KWARGS & set(template_kwargs or ()))
    if clash:
        raise InvalidRequestError(f"chat_template_kwargs may not set {', '.join(clash)}", "chat_template_kwargs")


def apply_chat_template(
    tokenizer,
    messages: list[dict],
    add_generation_prompt: bool = True,
    template_kwargs: dict | None = None,
    tools: list[dict] | None = None,
) -> list[int]:
    """Token ids of the rendered conversation (the template decides BOS). ``template_kwargs``
    become template variables (Qwen3's ``enable_thinking``), as vLLM's ``chat_template_kwargs``;
    ``tools`` are OpenAI tool definitions, for templates that describe them to the model."""
    check_template_kwargs(template_kwargs)
    extra = dict(template_kwargs or {}) | ({"tools": tools} if tools else {})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)
    return tokenizer.encode(text, add_special_tokens=False)
