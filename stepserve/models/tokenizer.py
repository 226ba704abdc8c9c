"""Tokenizer, chat template and end-of-sequence ids, through transformers."""

from __future__ import annotations

import json
import logging

from stepserve.models.loader import ModelSource

logging.getLogger("transformers").setLevel(logging.ERROR)


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    if source.gguf_file is not None:
        return AutoTokenizer.from_pretrained(str(source.directory), gguf_file=source.gguf_file)
    return AutoTokenizer.from_pretrained(str(source.directory))


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


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
    """Token ids of the rendered conversation (the template decides BOS); ``tools`` are OpenAI
    tool definitions, for templates that describe them to the model."""
    extra = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)
    return tokenizer.encode(text, add_special_tokens=False)
