"""What the front end needs about the model without loading it: tokenizer, context length,
vocabulary size, end-of-sequence ids. The weights load in the engine core process."""

from __future__ import annotations

from dataclasses import dataclass

from stepserve.config import ConfigError, EngineConfig
from stepserve.models.loader import decoder_config, open_checkpoint
from stepserve.models.tokenizer import eos_token_ids, load_tokenizer


@dataclass(frozen=True)
class FrontInfo:
    name: str  # the default served model name
    max_model_len: int  # context length in use
    vocab_size: int  # token ids must be below this
    eos_token_ids: frozenset[int]  # ids that end a sequence


def resolve_max_model_len(config: EngineConfig, hf_config: dict) -> int:
    native = hf_config.get("max_position_embeddings", 2048)
    max_model_len = config.model.max_model_len or native
    if max_model_len > native:
        raise ConfigError(f"max_model_len={max_model_len} exceeds the model's {native} positions")
    return max_model_len


def load_front(config: EngineConfig) -> tuple[object, FrontInfo]:
    """The tokenizer and the model facts the routes validate against. The model's config is
    checked here too, so that an unsupported architecture or setting stops the server at startup."""
    checkpoint = open_checkpoint(config.model.model)
    hf_config = checkpoint.hf_config
    max_model_len = resolve_max_model_len(config, hf_config)
    decoder_config(hf_config, max_model_len)
    tokenizer = load_tokenizer(checkpoint.source)
    eos = eos_token_ids(checkpoint.source, hf_config, tokenizer)
    return tokenizer, FrontInfo(checkpoint.source.name, max_model_len, hf_config["vocab_size"], eos)
