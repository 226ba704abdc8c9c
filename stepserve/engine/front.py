"""What the front end needs about the model without loading it: tokenizer, context length,
vocabulary size, end-of-sequence ids. The weights load in the engine core process."""

from __future__ import annotations

from dataclasses import dataclass

from stepserve.config import ConfigError, EngineConfig
from stepserve.generation_config import SamplingDefaults, load_sampling_defaults, log_sampling_defaults
from stepserve.models.gguf_cache import converted_source
from stepserve.models.loader import ModelSource, read_hf_config, resolve_source
from stepserve.models.tokenizer import eos_token_ids, load_tokenizer


@dataclass(frozen=True)
class FrontInfo:
    name: str  # the default served model name
    max_model_len: int  # context length in use
    vocab_size: int  # token ids must be below this
    eos_token_ids: frozenset[int]  # ids that end a sequence
    sampling_defaults: SamplingDefaults = SamplingDefaults()  # the model's, for fields a request leaves out


def model_source(config: EngineConfig) -> ModelSource:
    """The model's location, a GGUF replaced by its converted cache (converted once, here)."""
    source = resolve_source(config.model.model)
    return converted_source(source) if source.gguf_file is not None else source


def resolve_max_model_len(config: EngineConfig, hf_config: dict) -> int:
    native = hf_config.get("max_position_embeddings", 2048)
    max_model_len = config.model.max_model_len or native
    if max_model_len > native:
        raise ConfigError(f"max_model_len={max_model_len} exceeds the model's {native} positions")
    return max_model_len


def sampling_defaults(config: EngineConfig, source: ModelSource | None = None) -> SamplingDefaults:
    """The model's sampling defaults under ``--generation-config``, logged once (front only)."""
    source = source or model_source(config)
    model_dir = None if source.gguf_file is not None else source.directory  # a raw GGUF's folder is not the model's
    defaults = load_sampling_defaults(config.model.generation_config, model_dir)
    log_sampling_defaults(defaults)
    return defaults


def load_front(config: EngineConfig) -> tuple[object, FrontInfo]:
    """The tokenizer and the model facts the routes validate against."""
    source = model_source(config)
    hf_config = read_hf_config(source)
    tokenizer = load_tokenizer(source)
    max_model_len = resolve_max_model_len(config, hf_config)
    eos = eos_token_ids(source, hf_config, tokenizer)
    return tokenizer, FrontInfo(source.name, max_model_len, hf_config["vocab_size"], eos, sampling_defaults(config, source))
